from budgetwarden_client import BudgetClient, pb

from support import TEST_RPC_TIMEOUT_S


def test_sidecar_answers_a_check(sidecar):
    with BudgetClient(sidecar.addr, timeout=TEST_RPC_TIMEOUT_S) as client:
        answer = client.check(tenant_id="acme", task_id="t", step_id="s", estimated_input_tokens=10)
    assert answer.decision == pb.DECISION_ALLOW
    assert answer.granted_tokens == 10
