"""The `extproc` command: serve, manage API keys, check policies."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from extproc.audit.cli import add_audit_commands
from extproc.authn.apikey_cli import add_keys_commands
from extproc.health_probe import add_health_command


def _serve(args: argparse.Namespace) -> int:
    from extproc import server
    from extproc.authn.apikey import ApiKeyStore
    from extproc.policy.load import PolicyLoadError
    from extproc.policy.store import PolicyStore
    from extproc.settings import from_env

    try:
        settings = from_env(
            listen=args.listen,
            policy_dir=args.policies,
            api_keys_file=args.api_keys,
            workers=args.workers,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            insecure=True if args.insecure else None,
            grace_seconds=args.grace_seconds,
            log_level=args.log_level,
            quota_store=args.quota_store,
            audit_log=args.audit_log,
            audit_key_file=args.audit_key_file,
            audit_max_bytes=args.audit_max_bytes,
            metrics_listen=args.metrics_listen,
            otlp_endpoint=args.otlp_endpoint,
        )
    except ValueError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 2
    problems = settings.validate()
    if problems:
        for problem in problems:
            print(f"extproc: {problem}", file=sys.stderr)
        return 2
    # Validate policies in the parent, so a bad file stops everything with one clear message.
    try:
        PolicyStore(settings.policy_dir, ApiKeyStore.load(settings.api_keys_file), os.environ)
    except PolicyLoadError as exc:
        print(f"extproc: invalid policies, not starting:\n{exc}", file=sys.stderr)
        return 2
    return server.run(settings)


def _policy_check(args: argparse.Namespace) -> int:
    from extproc.authn.apikey import ApiKeyStore
    from extproc.policy.load import PolicyLoadError
    from extproc.policy.store import PolicyStore

    try:
        store = PolicyStore(args.directory, ApiKeyStore.load(args.api_keys), os.environ)
    except PolicyLoadError as exc:
        print(exc, file=sys.stderr)
        return 1
    current = store.current
    for policy in current.policies:
        print(f"{policy.file}: ok ({policy.model}, versions {', '.join(sorted(policy.versions))})")
    print(f"revision {current.revision}")
    if args.envoy_config is not None:
        return _check_envoy(args.directory, args.envoy_config)
    return 0


def _check_envoy(policy_dir: Path, config_path: Path) -> int:
    """Whether a rendered Envoy config serves these policies' versions as they say (routes,
    timeouts, retries, fallbacks, mirrors; pod clusters fit for models)."""
    import yaml

    from extproc.envoy_routes import check_clusters, check_routes
    from extproc.envoyconf import policy_upstreams

    try:
        config = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        print(f"{config_path}: cannot read: {exc}", file=sys.stderr)
        return 1
    upstreams = policy_upstreams(policy_dir)
    problems = check_clusters(config, upstreams) + check_routes(config, upstreams)
    for problem in problems:
        print(f"{config_path}: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"{config_path}: ok (routes and clusters fit the policies)")
    return 0


def _policy_schema(args: argparse.Namespace) -> int:
    from extproc.policy.reference import stale_files, write_files

    if args.check:
        stale = stale_files(args.out_dir)
        for name in stale:
            print(f"{args.out_dir / name}: stale; run `make docs` (extproc policy schema)",
                  file=sys.stderr)  # fmt: skip
        return 1 if stale else 0
    for path in write_files(args.out_dir):
        print(f"wrote {path}")
    return 0


def _policy_lint(args: argparse.Namespace) -> int:
    import json

    from extproc.policy.lint import SEVERITIES, lint

    findings = lint(args.directory, args.api_keys)
    if args.format == "json":
        print(json.dumps([f.as_dict() for f in findings], indent=2))
    else:
        for finding in findings:
            print(finding)
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    plural = {"error": "errors", "warning": "warnings", "info": "info"}
    print(", ".join(f"{n} {s if n == 1 else plural[s]}" for s, n in counts.items()),
          file=sys.stderr)  # fmt: skip
    failing = counts["error"] + (counts["warning"] if args.strict else 0)
    return 1 if failing else 0


def _policy_test(args: argparse.Namespace) -> int:
    from extproc.policy.expect import run_test_command

    return run_test_command(args.directory, args.fixtures, args.api_keys, args.format)


def _policy_explain(args: argparse.Namespace) -> int:
    from extproc.policy.explain import run_explain_command

    return run_explain_command(args.directory, args.request, args.api_keys, args.format)


def _policy_diff(args: argparse.Namespace) -> int:
    from extproc.policy.diff import run_diff_command

    return run_diff_command(
        args.old, args.new, args.recorded, args.api_keys, args.format, args.fail_on_change
    )


POLICY_TEST_HELP = """\
Each case is decided by the real decision core (the server's loader, authentication unless the
case gives an `identity:`, authorization, inspection, quotas) and compared with its `expect:`;
only the expectations given are checked. Every case starts with empty quota counters, so cases
never affect each other; `repeat: N` decides one case N times on shared counters and checks the
last decision. Exit 0: all pass; 1: a case failed; 2: a policy or fixture file is invalid.

A fixture file:

  cases:
    - name: a classifier may use iris
      path: /v2/models/iris/infer       # method POST, host gateway.test unless given
      body: {inputs: [...]}             # JSON; or body_text: "raw"
      headers: {x-model-version: v1}    # ${NAME} is read from the environment
      identity: {principal: alice, tenant: demo, roles: [classify]}   # method: jwt
      expect:
        outcome: allow                  # allow, deny or error
        version: v1
        cluster: demo-oip-v1
    - name: prompt injection is refused
      ...
      expect: {outcome: deny, status: 400, code: prompt_injection, phase: inspect}

expect: outcome, status, code, phase, reason (a substring), version, cluster, redactions
({type: count} masked in the request), flags, dry_run (the phases dry run would deny).
policies/tests/demo.cases.yaml is a complete example.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the decision server (ext_proc, ext_authz, health)")
    serve.add_argument("--listen", help="HOST:PORT (EXTPROC_LISTEN, default 127.0.0.1:9001)")
    serve.add_argument("--policies", type=Path, help="policy directory (EXTPROC_POLICY_DIR)")
    serve.add_argument("--api-keys", type=Path, help="API key store (EXTPROC_API_KEYS_FILE)")
    serve.add_argument("--workers", type=int, help="processes sharing the port (EXTPROC_WORKERS)")
    serve.add_argument("--tls-cert", type=Path, help="server certificate (EXTPROC_TLS_CERT)")
    serve.add_argument("--tls-key", type=Path, help="server private key (EXTPROC_TLS_KEY)")
    serve.add_argument(
        "--tls-client-ca", type=Path, help="CA of Envoy's client cert (EXTPROC_TLS_CLIENT_CA)"
    )
    serve.add_argument(
        "--insecure", action="store_true", help="plaintext gRPC; only for local benchmarks"
    )
    serve.add_argument("--grace-seconds", type=float, help="drain time on shutdown")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    serve.add_argument(
        "--quota-store",
        help="memory (default; one process) or a shared redis://, redis+cluster:// URL "
        "(EXTPROC_QUOTA_STORE)",
    )
    serve.add_argument(
        "--audit-log", type=Path, help="decision records, hash-chained (EXTPROC_AUDIT_LOG)"
    )
    serve.add_argument(
        "--audit-key-file", type=Path, help="HMAC key for the chain (EXTPROC_AUDIT_KEY_FILE)"
    )
    serve.add_argument(
        "--audit-max-bytes",
        type=int,
        help="rotate each audit file at this size; 0: never (EXTPROC_AUDIT_MAX_BYTES)",
    )
    serve.add_argument(
        "--metrics-listen", help="Prometheus /metrics on HOST:PORT (EXTPROC_METRICS_LISTEN)"
    )
    serve.add_argument(
        "--otlp-endpoint",
        help="OTLP/HTTP collector URL for traces and metrics (EXTPROC_OTLP_ENDPOINT)",
    )
    serve.set_defaults(func=_serve)

    policy = sub.add_parser("policy", help="tools for policy files")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_sub.add_parser("check", help="validate and compile a policy directory")
    check.add_argument("directory", type=Path)
    check.add_argument("--api-keys", type=Path, default=Path(".run/api-keys.json"))
    check.add_argument(
        "--envoy-config",
        type=Path,
        help="also check that this rendered Envoy config routes every version as the policies "
        "say (re-render and reload Envoy after a change to versions, timeouts or fallbacks)",
    )
    check.set_defaults(func=_policy_check)

    lint = policy_sub.add_parser(
        "lint",
        help="find rules that never apply or pass, redundant rules and fail-open settings",
    )
    lint.add_argument("directory", type=Path)
    lint.add_argument("--api-keys", type=Path, default=Path(".run/api-keys.json"))
    lint.add_argument("--format", choices=("text", "json"), default="text")
    lint.add_argument("--strict", action="store_true", help="warnings also fail (exit 1)")
    lint.set_defaults(func=_policy_lint)

    schema = policy_sub.add_parser(
        "schema", help="write the policy JSON Schemas and the policy reference (make docs)"
    )
    schema.add_argument(
        "--out-dir", type=Path, default=Path("."),
        help="repository root: schema/*.schema.json and docs/policy-reference.md go under it",
    )  # fmt: skip
    schema.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 listing stale files"
    )
    schema.set_defaults(func=_policy_schema)

    api_keys_help = "API key store, for requests that send a real key (default: none)"
    formats = ("text", "json")
    test = policy_sub.add_parser(
        "test",
        help="decide fixture requests with the real decision core and check the expectations",
        description=POLICY_TEST_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    test.add_argument("directory", type=Path)
    test.add_argument("fixtures", type=Path, nargs="+", metavar="FIXTURE")
    test.add_argument("--api-keys", type=Path, help=api_keys_help)
    test.add_argument("--format", choices=formats, default="text")
    test.set_defaults(func=_policy_test)

    explain = policy_sub.add_parser(
        "explain",
        help="decide one request and show every phase's verdict and why",
        description="REQUEST is one request in the format of a `policy test` case, without "
        "`expect:` (an audit record's recorded_request can be pasted as it is). Shows each "
        "phase's verdict, reason and time, the decision, what dry run would deny, what was "
        "masked, and the policy file and revision that decided. Quota counters start empty.",
    )
    explain.add_argument("directory", type=Path)
    explain.add_argument("request", type=Path, metavar="REQUEST")
    explain.add_argument("--api-keys", type=Path, help=api_keys_help)
    explain.add_argument("--format", choices=formats, default="text")
    explain.set_defaults(func=_policy_explain)

    diff = policy_sub.add_parser(
        "diff",
        help="replay recorded requests against two policy directories; list changed decisions",
        description="RECORDED files are audit logs (JSON lines; records without a "
        "recorded_request, from policies without audit.record_requests, are skipped and "
        "counted) or `policy test` fixture files (expectations ignored). Each request is "
        "decided for its recorded identity, with empty quota counters, by both directories; "
        "a change of outcome, status, code, version or cluster is listed. Exit 0 unless "
        "--fail-on-change; 2 when an input is invalid.",
    )
    diff.add_argument("old", type=Path, metavar="OLD_DIR")
    diff.add_argument("new", type=Path, metavar="NEW_DIR")
    diff.add_argument("recorded", type=Path, nargs="+", metavar="RECORDED")
    diff.add_argument("--api-keys", type=Path, help=api_keys_help)
    diff.add_argument("--format", choices=formats, default="text")
    diff.add_argument(
        "--fail-on-change", action="store_true", help="exit 1 when a decision changes"
    )
    diff.set_defaults(func=_policy_diff)

    keys = sub.add_parser("keys", help="manage API keys (only their hashes are stored)")
    add_keys_commands(keys.add_subparsers(dest="keys_command", required=True))

    audit = sub.add_parser("audit", help="tools for the decision audit log")
    add_audit_commands(audit.add_subparsers(dest="audit_command", required=True))
    add_health_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
