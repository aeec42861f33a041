"""kind: its cluster config (:mod:`.config`, pure) and the driver that runs it (:mod:`.driver`)."""
