"""pyvirt's web GUI: static front-end files served by pyvirtd (``pyvirt daemon --web``)."""
