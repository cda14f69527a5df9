"""Live debug view: a websocket relay of the manager's state and a static page (--relay)."""
