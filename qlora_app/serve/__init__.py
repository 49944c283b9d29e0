"""The serve stage, one job a module: what to serve (target), the checks before start (checks), vLLM's command
line (command), the server process (process), the API-key middleware loaded into vLLM (auth), and the stage that
ties them together (stage).

Kept free of imports: vLLM's process imports qlora_app.serve.auth and must not pull in the rest.
"""
