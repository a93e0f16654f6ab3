"""aigw, an AI egress gateway, as a mitmproxy addon: `mitmdump -s addon/gateway.py`.

This file is only the entry point mitmproxy loads (and reloads whenever it changes); the gateway
lives in the `addon` package (addon/hooks.py and what it imports), so updating the code does not
trigger a script reload in production.
"""

from addon.hooks import Gateway

addons = [Gateway()]
