"""`python -m pgolf.cli ...`: what torchrun runs on the cloud (`torchrun ... -m pgolf.cli run`)."""

from pgolf.cli import entrypoint

if __name__ == "__main__":
    entrypoint()
