"""AgileX PiPer arm over CAN, through the vendor's piper_sdk (imported lazily by the backend)."""
