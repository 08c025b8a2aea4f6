"""AgileX Cobot Magic: two puppet PiPers driven as one 14-value robot (masters read for recording)."""
