"""Sparse autoencoders: the TopK SAE, its trainer, its file formats and the Hub.

==================  ==========================================================================================
``model``           :class:`~hf_dataselect.sae.model.TopKSAE` (encode / decode / forward with FVU and AuxK)
``kernels``         sparse encoder and decoder autograd functions (no dense ``[tokens, latents]`` gradients)
``screening``       exact TopK through a verified bfloat16 screen (CPUs with AMX; ``HF_DATASELECT_SAE_SCREEN``)
``activations``     hookpoint resolution and hidden states at a hookpoint, special tokens dropped
``store``           training batches of activations: a disk cache (several epochs) or a shuffle buffer stream
``train``           :func:`~hf_dataselect.sae.train.train_sae` and the trainer (Gao et al. 2024 recipe)
``io``              save / load: our format (sparsify layout + metadata), EleutherAI sparsify, SAELens
``card``            the model card (``README.md``) rendered from ``model_cards/``
``hub``             push to / download from the Hugging Face Hub
``auto``            the small SAE trained on a pool's own activations (``sae="auto"``), cached on disk
==================  ==========================================================================================

Import the submodules you need; this package imports nothing heavy on its own.
"""
