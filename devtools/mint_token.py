"""`python -m devtools.mint_token`: mint a dev JWT signed with KEFU_JWT_SECRET (HS256)."""

from __future__ import annotations

import argparse
import sys
import time

import jwt

from gateway.auth import ROLES
from services.common.settings import KefuSettings, SettingsError, check_secret


def mint(secret: str, *, tenant: str, subject: str, role: str, ttl_s: int = 3600,
         issuer: str = "", audience: str = "", name: str = "") -> str:
    now = int(time.time())
    claims: dict[str, object] = {"sub": subject, "tenant": tenant, "role": role, "iat": now, "exp": now + ttl_s}
    if name:
        claims["name"] = name
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenant", default="demo")
    parser.add_argument("--sub", default="visitor-1", help="user id (JWT sub)")
    parser.add_argument("--role", default="visitor", choices=sorted(ROLES))
    parser.add_argument("--ttl", type=int, default=24 * 3600, help="seconds until it expires")
    args = parser.parse_args(argv)
    env = KefuSettings.environment()  # the process environment over ./.env, as every kefu process reads it
    secret = env.get("KEFU_JWT_SECRET", "")
    if not secret:
        sys.exit("mint_token: set KEFU_JWT_SECRET (make run prints one)")
    try:
        check_secret("KEFU_JWT_SECRET", secret)
    except SettingsError as error:
        sys.exit(f"mint_token: {error}")
    print(mint(secret, tenant=args.tenant, subject=args.sub, role=args.role, ttl_s=args.ttl,
               issuer=env.get("KEFU_JWT_ISSUER", ""), audience=env.get("KEFU_JWT_AUDIENCE", "")))


if __name__ == "__main__":
    main()
