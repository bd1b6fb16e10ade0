"""Images into vision-language prompts: loading and preprocessing (Pillow), and prompt layouts."""
