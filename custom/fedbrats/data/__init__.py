"""BraTS data: naming conventions, synthetic generator, datalist preparation, validation and transforms."""
