"""armada drivers: one backend per device, the generic driver process, fakes and cameras."""
