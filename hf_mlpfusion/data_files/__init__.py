"""Data shipped with hf-mlpfusion: the built-in calibration text (see hf_mlpfusion.text and NOTICE)."""
