"""Python client for the budgetwarden sidecar.

    from budgetwarden_client import BudgetClient

    with BudgetClient() as budget:                      # BUDGETWARDEN_ADDR or 127.0.0.1:50151
        answer = budget.check(tenant_id="acme", task_id="t1", step_id="s1", estimated_input_tokens=1200,
                              max_output_tokens=800)
"""

from budgetwarden_client._client import DEFAULT_ADDR, AsyncBudgetClient, BudgetClient, default_addr
from budgetwarden_api.v1 import budget_pb2 as pb

__all__ = ["DEFAULT_ADDR", "AsyncBudgetClient", "BudgetClient", "default_addr", "pb"]
