"""Opacus is loaded where DP work starts, never by a site, coordinator or simulator without DP.

Its package import costs about 3 s of CPU (``torch.distributed.tensor``, ``scipy.stats``) in
every site process; the DP path must still get Opacus with our grad samplers registered.
Each check runs in a fresh interpreter, since this test session has long since imported Opacus.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import sys
    import client.app, client.cli, server.app, simulation.cli
    from hymate.privacy import ACCOUNTANTS, DPConfig, LedgerError, PrivacyBudgetExhausted, PrivacyLedger

    DPConfig(target_epsilon=8.0, delta=1e-5)
    print("opacus at import:", "opacus" in sys.modules)

    from hymate.privacy import make_private
    from hymate.model import SelectiveSSM
    from opacus import GradSampleModule

    print("opacus for DP:", "opacus" in sys.modules)
    print("SelectiveSSM grad sampler:", SelectiveSSM in GradSampleModule.GRAD_SAMPLERS)
    try:
        import hymate.privacy as privacy

        privacy.no_such_name
    except AttributeError as e:
        print("unknown name:", e)
    """
)


def test_only_dp_work_loads_opacus_and_it_comes_with_our_grad_samplers():
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "opacus at import: False" in lines
    assert "opacus for DP: True" in lines
    assert "SelectiveSSM grad sampler: True" in lines
    assert "unknown name: module 'hymate.privacy' has no attribute 'no_such_name'" in lines
