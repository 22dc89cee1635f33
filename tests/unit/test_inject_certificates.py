"""The webhook's self-signed certificates (inject/_tls.py): a CA that signs, and a serving certificate it issued that
signs nothing itself."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from budgetwarden.inject import generate_ca, issue_serving_certificate


def test_the_ca_signs_certificates_and_the_serving_certificate_only_serves() -> None:
    ca_pem, ca_key_pem = generate_ca()
    cert_pem, key_pem = issue_serving_certificate(ca_pem, ca_key_pem, ["budgetwarden-injector.ns.svc", "10.0.0.7"])
    ca, cert = x509.load_pem_x509_certificate(ca_pem), x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(ca)
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ca_usage.critical
    assert usage.critical
    assert (ca_usage.value.digital_signature, ca_usage.value.key_cert_sign, ca_usage.value.crl_sign) == (True,) * 3
    assert (usage.value.digital_signature, usage.value.key_cert_sign, usage.value.crl_sign) == (True, False, False)
    for pem, certificate in ((ca_key_pem, ca), (key_pem, cert)):
        key = serialization.load_pem_private_key(pem, password=None)
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS #8, unencrypted
        assert key.public_key() == certificate.public_key()
