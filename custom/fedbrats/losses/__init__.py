"""Losses shared by several methods: segmentation (:mod:`.segmentation`), logit distillation (:mod:`.distillation`),
mean-teacher consistency (:mod:`.consistency`), mutual distillation (:mod:`.mutual`), unsupervised terms
(:mod:`.unsupervised`). A method's own losses live in its folder under :mod:`fedbrats.federated.methods`."""
