"""The `extproc` command: serve, manage API keys, check policies."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from extproc.authn.apikey_cli import add_keys_commands


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

    keys = sub.add_parser("keys", help="manage API keys (only their hashes are stored)")
    add_keys_commands(keys.add_subparsers(dest="keys_command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
