"""ARX Lift 2: two ARX X5 arms with grippers, a lift column and an omni base, as one robot."""
