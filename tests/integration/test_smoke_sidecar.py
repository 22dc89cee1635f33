from budgetwarden_client import BudgetClient, pb


def test_sidecar_answers_a_check(sidecar):
    with BudgetClient(sidecar.addr) as client:
        answer = client.check(tenant_id="acme", task_id="t", step_id="s", estimated_input_tokens=10)
    assert answer.decision == pb.DECISION_ALLOW
    assert answer.granted_tokens == 10
