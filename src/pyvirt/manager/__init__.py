"""pyvirtd: the management daemon (docs/manager.md). Its parts: ``paths``,
``db`` (the SQLite store), ``events``, ``tasks``, ``domain`` (definitions),
``vmproc`` (VMM processes), ``manager`` (the facade), ``storage``, ``network``,
``privilege``, ``api`` (HTTP) and ``daemon`` (the process). Nothing is imported
here: ``pyvirt run`` never loads the daemon."""
