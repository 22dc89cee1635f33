"""Budgets for the agent frameworks people use, each through the framework's own hook: the one that can both stop a
call and learn its real usage. Each integration is an optional extra of ``budgetwarden-client``
(``pip install "budgetwarden-client[openai]"``) and imports its framework only when it is imported itself."""
