"""TLS: an embedded cluster secured with certificates (written to files, signed by a
throw-away CA) accepts only clients that hold them, and reconstructs through them."""

from __future__ import annotations

import datetime
import gc
import ipaddress

import dask.config
import numpy as np
import pytest

import daskptycho as dp
from daskptycho.cli import main

x509 = pytest.importorskip("cryptography.x509", reason="TLS certificates need the cryptography package")


def _write_certificates(directory):
    """A CA and one certificate/key pair it signed (for 127.0.0.1), as PEM files."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "daskptycho test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "daskptycho")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"tls-ca-file": directory / "ca.pem", "tls-cert": directory / "cert.pem", "tls-key": directory / "key.pem"}
    paths["tls-ca-file"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["tls-cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["tls-key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return {f"daskptycho.cluster.{k}": str(v) for k, v in paths.items()}


def test_tls_cluster_from_certificate_files_refuses_plain_clients_and_reconstructs(tmp_path, small_pbtio3):
    from distributed import Client

    certs = _write_certificates(tmp_path)
    with dask.config.set({**certs, "daskptycho.cluster.tls": True, "daskptycho.cluster.connect-timeout": 3}):
        with dp.connect("local", workers=2) as conn:
            addr = conn.scheduler_address
            assert addr.startswith("tls://127.0.0.1:")
            assert conn.security is not None and conn.security.require_encryption
            assert conn.security.tls_ca_file == certs["daskptycho.cluster.tls-ca-file"]
            workers = conn.client.nthreads()
            assert len(workers) == 2 and all(w.startswith("tls://127.0.0.1:") for w in workers)
            # a client speaking plain TCP to the TLS port gets nowhere
            with pytest.raises((OSError, TimeoutError)):
                Client(addr.replace("tls://", "tcp://"), timeout=2)
            # nor does one asking for TLS without the certificates
            with pytest.raises((OSError, TimeoutError, TypeError, ValueError)):
                Client(addr, timeout=2)
            # finalise the two failed clients here: collected later, in whatever thread a garbage
            # collection happens to run, their __del__ stops their event loops from inside the
            # starting loop thread of the next client, which then never starts
            gc.collect()
            # a second client with the certificate files (from the config) is let in
            with dp.connect(addr) as other:
                assert other.client.submit(sum, [1, 2], pure=False).result() == 3
            res = dp.reconstruct(small_pbtio3, engine="gd", tiles=(2, 2), iterations=2, slices=2, client=conn.client)
            # the peer messages kept to the encrypted comms: no worker opened a same-host socket
            from daskptycho.tasks import peer

            inboxes = conn.client.run(lambda dask_worker: dask_worker.plugins[peer.NAME].inbox)
            assert len(inboxes) == 2 and all(v is None for v in inboxes.values())
    c = res.cost.values
    assert np.all(np.isfinite(c)) and c[-1] < c[0]
    assert np.isfinite(res.object.values).all()


def test_temporary_certificates_for_an_embedded_cluster(tmp_path, small_pbtio3, capsys):
    """No certificate files: tls=True (--tls) makes an in-memory pair for the embedded cluster."""
    with dp.connect("local", workers=1, tls=True) as conn:
        assert conn.scheduler_address.startswith("tls://127.0.0.1:")
        assert conn.security.tls_ca_file.startswith("-----BEGIN")  # Security.temporary(): PEM text, no files
        assert conn.client.submit(sum, [1, 2], pure=False).result() == 3
    out = tmp_path / "r.zarr"
    rc = main(["reconstruct", str(small_pbtio3), "--out", str(out), "--engine", "ml", "--slices", "2", "--iterations", "1",
               "--tls", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert dp.open_result(out).cost.size == 1


def test_remote_tls_scheduler_needs_certificate_files():
    with pytest.raises(dp.OptionsError, match="certificate files"):
        dp.connect("tls://127.0.0.1:1")
