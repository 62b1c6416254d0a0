"""--master without --kubeconfig keeps this Pod's service-account credentials (https only)."""

from __future__ import annotations

import asyncio

from kubernetes_asyncio import client

from dataplane.sync import kube
from dataplane.sync.kube import ApiSettings, api_client


def test_service_account_token_and_ca_are_read(tmp_path):
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    configuration = type.__call__(client.Configuration)
    kube._service_account_credentials(configuration, str(tmp_path))
    assert configuration.api_key == {"BearerToken": "Bearer sa-token"}
    assert configuration.ssl_ca_cert == str(tmp_path / "ca.crt")


def test_no_service_account_means_no_credentials(tmp_path):
    configuration = type.__call__(client.Configuration)
    kube._service_account_credentials(configuration, str(tmp_path / "absent"))
    assert configuration.api_key == {}


def test_an_https_master_asks_for_them_and_a_plain_http_one_does_not(monkeypatch):
    asked = []
    monkeypatch.setattr(kube, "_service_account_credentials", lambda configuration: asked.append(configuration))

    async def build(master):
        api = await api_client(ApiSettings(master=master))
        host = api.configuration.host
        await api.close()
        return host

    assert asyncio.run(build("https://10.0.0.1:6443/")) == "https://10.0.0.1:6443"
    assert len(asked) == 1
    assert asyncio.run(build("http://127.0.0.1:6443")) == "http://127.0.0.1:6443"
    assert len(asked) == 1, "a token is never sent in the clear"
