"""The admin REST API of `aigw serve`: the endpoints (`routes`), the JSON bodies they take
(`payloads`), what they run on (`backend`) and the HTTP server with its authentication and error
shape (`server`)."""
