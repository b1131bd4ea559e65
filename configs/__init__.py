"""ml-collections configuration files (`--config=configs/NAME.py[:ARG]`)."""
