"""Jinja templates for the model cards written next to saved SAEs (installed as ``hf_dataselect.model_cards``)."""
