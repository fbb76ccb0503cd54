"""pytest plugin: the `sampler_checks` fixture runs the kit inside a user's test suite.

Enable it in a conftest.py with `pytest_plugins = ["diffsolve.testing.pytest_plugin"]`, then:

    def test_my_sampler(sampler_checks):
        report = sampler_checks(MySolver)            # or a k-diffusion-style function, or a Sampler
        assert report["order"].measured > 1.8        # the SuiteReport, when every check passed

`sampler_checks(obj, kind=None, config=None, checks=None, **meta)` fails the test with the table and the details of
every failed check. `--diffsolve-checks-details` prints the table of passing runs too (with -s).
"""
import pytest

from .suite import check_sampler

__all__ = ["pytest_addoption", "sampler_checks"]


def pytest_addoption(parser):
    parser.addoption("--diffsolve-checks-details", action="store_true", default=False,
                     help="print the diffsolve.testing table of every sampler_checks call")


@pytest.fixture
def sampler_checks(request):
    """Run `diffsolve.testing.check_sampler` on a sampler; fail the test naming every failed check."""
    verbose = request.config.getoption("--diffsolve-checks-details", default=False)

    def run(obj, kind=None, config=None, checks=None, **meta):
        report = check_sampler(obj, kind, config, checks, **meta)
        if verbose:
            print(report.table(details=True))
        if not report.passed:
            pytest.fail(report.table(details=True), pytrace=False)
        return report
    return run
