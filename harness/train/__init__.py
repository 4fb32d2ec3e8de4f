"""Fine-tuning and the one prompt-template module that fine-tuning and calibration share."""
