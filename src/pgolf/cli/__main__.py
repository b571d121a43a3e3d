"""`python -m pgolf.cli ...`: what torchrun runs for package runs on the cloud (sky/dev.yaml, sky/long.yaml:
`torchrun ... -m pgolf.cli run`); record launches run the generated ship/train_gpt.py instead."""

from pgolf.cli import entrypoint

if __name__ == "__main__":
    entrypoint()
