"""Cloud: launching on rented GPUs (launch.py drives sky/*.yaml with SkyPilot) and what it costs (cost.py)."""
