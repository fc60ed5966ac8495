"""The web port's ASGI application: its routes, and the authentication in front of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pynetdicom import AllStoragePresentationContexts
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from agent.db.database import Database
from agent.receive.handlers import ArrivalSink
from agent.receive.scp import TRANSFER_SYNTAXES
from agent.settings import Settings
from agent.spool.layout import SpoolLayout
from agent.spool.watermark import Watermark
from agent.spool.writable import SpoolWritable
from agent.web.api import HEALTH_PATH, Api
from agent.web.auth import Authenticator, RequireAuth
from agent.web.stow import StowPolicy, StowService

if TYPE_CHECKING:  # the pull modules load only where sources are configured
    from agent.pull.service import Pulls

# Paths served without credentials; every other one needs them (or allow_anonymous).
PUBLIC_PATHS = (HEALTH_PATH,)


@dataclass(frozen=True)
class WebServices:
    """What the routes work with, handed in by `serve`: no route looks anything up globally."""

    settings: Settings
    layout: SpoolLayout
    db: Database
    # Told of each instance stored through STOW-RS, as the receiver tells it (the assembler).
    sink: ArrivalSink
    watermark: Watermark | None = None
    # The service's pulls (its sources, shared with the pollers); made here when not given.
    pulls: Pulls | None = None
    # Whether the spool takes new files, for /api/health; made here when not given.
    writable: SpoolWritable | None = None


def stow_policy(settings: Settings) -> StowPolicy:
    """The receiver's rules for the STOW-RS door: what C-STORE would accept, STOW-RS accepts."""
    sop_classes = {str(context.abstract_syntax) for context in AllStoragePresentationContexts}
    return StowPolicy(
        sop_classes=frozenset(sop_classes | set(settings.receiver.private_sop_classes)),
        transfer_syntaxes=frozenset(TRANSFER_SYNTAXES),
        max_instance_bytes=settings.receiver.max_instance_bytes,
        max_request_bytes=settings.web.max_request_bytes,
    )


def routes(services: WebServices) -> list[BaseRoute]:
    """Every route of the web port; a new feature adds its own list here."""
    stow = StowService(
        services.layout, services.sink, stow_policy(services.settings), watermark=services.watermark
    )
    extra: list[BaseRoute] = []
    if services.settings.sources:
        # POST /api/studies/{uid}/process: pull a study from a [[sources]] entry.
        from agent.pull.api import ProcessApi
        from agent.pull.service import Pulls

        pulls = services.pulls or Pulls(services.settings, services.db, services.layout)
        extra = ProcessApi(pulls).routes()
    writable = services.writable or SpoolWritable(services.layout.tmp)
    api = Api(services.db, services.watermark, writable)
    return [*api.routes(), *stow.routes(), *extra]


def create_app(services: WebServices, authenticator: Authenticator | None = None) -> Starlette:
    """The application; `authenticator` defaults to the [web] settings' tokens and users.

    Raises ConfigError when a configured secret cannot be read.
    """
    if authenticator is None:
        authenticator = Authenticator.from_settings(services.settings.web)
    return Starlette(
        routes=routes(services),
        middleware=[Middleware(RequireAuth, authenticator=authenticator, public=PUBLIC_PATHS)],
    )
