"""What a run's model reads besides its batches' tokens: the starting weights (`init_from`), and each batch's
context (retrieved neighbours, document ids)."""
