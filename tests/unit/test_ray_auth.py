"""``dtrain launch --ray --address A`` refuses a Ray cluster without token authentication.

The check asks the cluster's GCS one RPC without a token (:func:`token_auth_enforced`). Here the
GCS is a stand-in gRPC server on loopback that serves Ray's own ``NodeInfoGcsService`` stubs and
either answers (auth off) or refuses with UNAUTHENTICATED (what a token-auth GCS does; checked
against a real Ray 2.60 head by hand, see SECURITY.md). Exact checks, about 5 s.
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent import futures

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("ray")

from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc  # noqa: E402

from dtrain.launch.ray_cluster import RayUnavailable, require_token_auth, token_auth_enforced  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "train_gpt.py")


class _Gcs(gcs_service_pb2_grpc.NodeInfoGcsServiceServicer):
    def __init__(self, auth: bool) -> None:
        self.auth = auth

    def GetClusterId(self, request, context):  # noqa: N802 - Ray's RPC name
        if self.auth and ("authorization", "Bearer t0ken") not in context.invocation_metadata():
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken: Authentication token is missing")
        return gcs_service_pb2.GetClusterIdReply(cluster_id=b"x" * 28)


@pytest.fixture(params=[False, True], ids=["no-auth", "token-auth"])
def gcs(request):
    server = grpc.server(futures.ThreadPoolExecutor(2))
    gcs_service_pb2_grpc.add_NodeInfoGcsServiceServicer_to_server(_Gcs(request.param), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield request.param, f"127.0.0.1:{port}"
    server.stop(0)


def test_cluster_without_token_auth_is_refused_unless_insecure(gcs):
    auth, address = gcs
    assert token_auth_enforced(address) == (auth, "")
    if auth:
        require_token_auth(address)
        return
    with pytest.raises(RayUnavailable, match="does not require token authentication.*--insecure"):
        require_token_auth(address)
    got = subprocess.run([sys.executable, "-m", "dtrain.launch.cli", "launch", "--ray", "--address", address,
                          "--nodes", "1", SCRIPT], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert got.returncode != 0
    lines = got.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not require token authentication" in lines[0], got.stderr
    assert "Traceback" not in got.stderr


def test_unanswered_check_is_refused_and_insecure_needs_an_address():
    with pytest.raises(RayUnavailable, match="cannot check.*--insecure"):
        require_token_auth("ray://127.0.0.1:10001")
    got = subprocess.run([sys.executable, "-m", "dtrain.launch.cli", "launch", "--ray", "--insecure", SCRIPT],
                         capture_output=True, text=True, timeout=120)
    assert got.returncode != 0 and "--insecure applies only with --address" in got.stderr, got.stderr
