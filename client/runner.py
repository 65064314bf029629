"""The site's own ClientApp runner: only the code this hospital installed ever handles its data.

Flower's stock executor (``flower-superexec`` starting ``flwr-clientapp``) installs the app
bundle (FAB) the coordinator sent and imports the ClientApp from that bundle's folder, so a
coordinator could ship its own training code, DP mechanism or audit to every hospital. Here the
SuperNode runs with ``--isolation process`` and this runner takes its tasks instead:

- it acquires each task from the SuperNode's local Runtime API (loopback, authenticated with
  a per-start secret, so no other local process can take a task), pulls the message, context
  and FAB, and runs the installed ``client.app.app`` in this process;
- the FAB is never unpacked, installed or imported: it is only inspected, and refused when it
  carries site-side code (``client/``, ``hymate/``), names another ClientApp, or is not among
  the hashes the site pinned; the refusal is the reply, so the coordinator sees the reason;
- the process stays up across messages, so torch, numba's compiled kernels and the site's
  parsed data are loaded once, not once per message.

It speaks Flower 1.42's Runtime API through the same calls ``flwr-clientapp`` makes
(``flwr.supernode.runtime.run_clientapp``); the project pins flwr to that series.
"""

from __future__ import annotations

import io
import logging
import secrets
import threading
import time
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

log = logging.getLogger("hymate-client.runner")  # shown with hymate-client's own messages

#: The only ClientApp a site runs, from its installed package.
INSTALLED_CLIENTAPP = "client.app:app"
#: Top-level folders of the site-side packages: a FAB carrying any of them tries to replace them.
SITE_PACKAGES = ("client", "hymate")
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"
#: How long a task's calls wait for a SuperNode that stopped answering before the task is let go.
TASK_PATIENCE_S = 60.0
_RETRIED_STATUS = frozenset({502, 503, 504})


def runtime_retry_invoker(max_time: float | None = TASK_PATIENCE_S, max_tries: int | None = None) -> RetryInvoker:
    """Retries for this runner's calls to its SuperNode: transport errors and 502/503/504 are
    retried (for at most ``max_time`` seconds), any other HTTP error gives up at once.

    Why not Flower's ``make_simple_http_retry_invoker``: on a 401 it sends SIGINT to its own
    process, which suits a one-shot ``flwr-clientapp`` but here is ``hymate-client`` itself. A
    SuperNode restarted while a task was in flight answers the old task's token with 401, and that
    SIGINT ended the site (its supervisor stopped the fresh SuperNode, and the interpreter then hung
    on the task's pull threads). A stale task is lost, never the site: the coordinator's next message
    comes as a new task from the new SuperNode.
    """

    def give_up(e: Exception) -> bool:
        return isinstance(e, httpx.HTTPStatusError) and e.response.status_code not in _RETRIED_STATUS

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=5.0),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=max_tries,
        max_time=max_time,
        should_giveup=give_up,
    )


class AppRefused(RuntimeError):
    """The coordinator's app bundle may not run here; the message says why (sent back as the reply)."""


@dataclass(frozen=True)
class AppPolicy:
    """Which app bundles a site accepts. The installed ClientApp runs whatever the FAB says;
    the policy decides whether the site takes part in the run at all."""

    #: SHA-256 hashes of the FABs the site accepts (empty: any FAB that passes the other checks).
    accepted_fab_hashes: frozenset[str] = field(default_factory=frozenset)

    def check(self, fab: Fab) -> None:
        """Raise AppRefused if the site must not take part in the run that sent ``fab``."""
        if self.accepted_fab_hashes and fab.hash_str not in self.accepted_fab_hashes:
            raise AppRefused(
                f"app bundle {fab.hash_str[:12]}... is not among the {len(self.accepted_fab_hashes)} "
                "app hash(es) this site accepts (its accept-app-hash setting)"
            )
        try:
            with zipfile.ZipFile(io.BytesIO(fab.content)) as bundle:
                names = bundle.namelist()
                config = tomllib.loads(bundle.read("pyproject.toml").decode()) if "pyproject.toml" in names else {}
        except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise AppRefused(f"app bundle {fab.hash_str[:12]}... is not a readable Flower app ({e})") from None
        shipped = sorted(n for n in names if n.split("/", 1)[0] in SITE_PACKAGES and not n.endswith("/"))
        if shipped:
            raise AppRefused(
                f"the coordinator's app carries site-side code ({', '.join(shipped[:3])}"
                f"{', ...' if len(shipped) > 3 else ''}); this site runs only its installed hymate-fl"
            )
        named = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")
        if named not in (None, INSTALLED_CLIENTAPP):
            raise AppRefused(
                f"the coordinator's app names ClientApp {named!r}; this site runs only {INSTALLED_CLIENTAPP} "
                "from its installed hymate-fl"
            )


def new_runtime_secret(path: Path) -> Path:
    """A fresh secret shared by the SuperNode and this runner only (mode 0600), for one start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(secrets.token_bytes(32))
    return path


def _error_reply(message: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=message)


class SiteRunner:
    """Takes ClientApp tasks from the local SuperNode and runs the installed ClientApp on them.

    Runs in a thread of ``hymate-client`` (``start``/``stop``); it outlives SuperNode restarts
    (the Runtime API client retries until the SuperNode is back on the same port).
    """

    def __init__(
        self,
        runtime_address: str,
        secret: bytes,
        app: ClientApp,
        policy: AppPolicy | None = None,
        poll_seconds: float = 0.2,
        task_patience_s: float = TASK_PATIENCE_S,
    ):
        self.runtime_address = runtime_address
        self.task_patience_s = task_patience_s
        self.app = app
        self.policy = policy or AppPolicy()
        self.poll_seconds = poll_seconds
        self.tasks_run = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._acquirer = RuntimeHttpClient.from_server_address(
            server_address=runtime_address,
            insecure=True,  # loopback only, between two processes of this site
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=[_ACQUIRE]),
            ],
            # One try: while the SuperNode restarts, serve() waits and asks again, without log noise.
            retry_invoker=runtime_retry_invoker(max_tries=1),
        )

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve, name="hymate-site-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def serve(self) -> None:
        """Acquire and run tasks until stopped."""
        while not self._stop.is_set():
            try:
                answer = self._acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except Exception as e:  # the SuperNode is restarting: try again shortly
                log.debug("runtime API not answering: %s", e)
                self._stop.wait(1.0)
                continue
            if answer.HasField("task") and answer.token:
                self.run_task(answer.token)
            else:
                self._stop.wait(self.poll_seconds)

    def run_task(self, token: str) -> None:
        """One message: pull it, decide, run the installed ClientApp (or refuse), push the reply."""
        client = RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=runtime_retry_invoker(self.task_patience_s),
        )
        heartbeat = HeartbeatSender(lambda: _send_heartbeat(client))
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        started = time.perf_counter()
        try:
            heartbeat.start()
            message, context, fab = pull_task_input(client)
            self.policy.check(fab)
            reply = self.app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except AppRefused as e:
            log.error("refused a message of run %s: %s", message.metadata.run_id if message else "?", e)
            details = f"site refused the app: {e}"
            if message is not None:
                reply = _error_reply(message, ErrorCode.INVALID_FAB, details)
        except Exception as e:
            details = f"{type(e)}:<'{e}'>"  # the reason format flwr-clientapp uses
            if message is None:  # its SuperNode restarted (the token is stale) or stopped answering
                log.warning("let go of a task its SuperNode no longer serves: %s", e)
            else:
                log.exception("the ClientApp raised")
                reply = _error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, details)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client, context, status, details)
            except Exception:
                log.exception("could not hand the reply to the SuperNode")
            heartbeat.stop()
            client.close()
        self.tasks_run += 1
        if message is not None:
            log.info(
                "%s message of run %d handled in %.2f s (%s)",
                message.metadata.message_type,
                message.metadata.run_id,
                time.perf_counter() - started,
                status,
            )


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Fab]:
    """The task's message, context and FAB, as ``flwr-clientapp`` pulls them, but polling quickly.

    A task becomes available while the SuperNode is still fetching the message's objects from
    the coordinator. Flower's own pull backs off 1, 2, 4, 8 s on each missing object, which a
    fresh ``flwr-clientapp`` hid behind its seconds of start-up; a runner that is already up
    waited ~9 s per message for it. Polling every 50-250 ms takes what the SuperNode needs.
    """
    task = client.PullTaskInput(PullTaskInputRequest())
    context = context_from_proto(task.context)
    messages = client.PullMessages(PullAppMessagesRequest())
    if not messages.messages_list:
        raise RuntimeError("the SuperNode handed out a task without a message")
    node = Node(node_id=context.node_id)
    tree = messages.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=0.05,
        backoff_cap=0.25,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as flwr-clientapp sets it
    return message, context, fab_from_proto(task.fab)


def _send_heartbeat(client: RuntimeHttpClient) -> bool:
    """Keep the task alive while the ClientApp works (Flower's own sender would SIGINT the process
    when the SuperNode forgets the task; a long-lived runner just lets that task go)."""
    try:
        client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
    except Exception:
        return False
    return True
