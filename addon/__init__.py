"""aigw's mitmproxy addon: `mitmdump -s addon/gateway.py`."""
