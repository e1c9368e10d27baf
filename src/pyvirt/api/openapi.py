"""The OpenAPI 3.1 document of the control API (``GET /openapi.json``).

Kept as Python data next to the server so that the two change together; the
tests check that every route the server has is described here (and nothing
else) and validate every response they receive against this document.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from pyvirt import __version__

__all__ = ["API_VERSION", "document", "document_json"]

#: bumped when a change to the API would break an existing client
API_VERSION = "1"

_JSON = "application/json"
_FAULT = {"$ref": "#/components/schemas/Fault"}


def _fault(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    resp: dict[str, Any] = {"description": description,
                            "content": {_JSON: {"schema": _FAULT}}}
    if headers:
        resp["headers"] = headers
    return resp


def _schema(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _action(summary: str, description: str, legal: str) -> dict[str, Any]:
    """A ``PUT /vm/<action>`` that takes no arguments and answers 204."""
    return {"put": {
        "summary": summary,
        "description": f"{description}\n\nLegal when the VM is {legal}; otherwise 409.",
        "operationId": summary.lower().replace(" ", "_").replace("-", "_"),
        "requestBody": {
            "required": False,
            "description": "No arguments: an empty body or an empty JSON object.",
            "content": {_JSON: {"schema": {"$ref": "#/components/schemas/NoArguments"}}},
        },
        "responses": {
            "204": {"description": "Done."},
            "400": _ref("BadRequest"),
            "409": _ref("Refused"),
            "415": _ref("UnsupportedMediaType"),
            "500": _ref("InternalError"),
        },
    }}


_SCHEMAS: dict[str, Any] = {
    "Fault": {
        "type": "object",
        "description": "Every error answer: one line saying what went wrong.",
        "required": ["fault_message"],
        "properties": {"fault_message": {"type": "string", "minLength": 1}},
        "additionalProperties": False,
    },
    "VmState": {
        "type": "string",
        "enum": ["created", "running", "paused", "stopped", "crashed"],
    },
    "VmInfo": {
        "type": "object",
        "required": ["state", "uptime_s", "backend", "pyvirt_version", "config", "boot_count"],
        "properties": {
            "state": {"$ref": "#/components/schemas/VmState"},
            "uptime_s": {"type": "number", "minimum": 0,
                         "description": "Seconds since the VM was first started."},
            "backend": {"type": "string", "description": "CPU backend: kvm or emu."},
            "pyvirt_version": {"type": "string"},
            "config": {"type": "object",
                       "description": "The VM configuration, as `pyvirt run --config` reads it."},
            "boot_count": {"type": "integer", "minimum": 0,
                           "description": "Boots so far (a guest reboot adds one)."},
            "nics": {"type": "array", "description": "The NICs, eth0 first.", "items": {
                "type": "object",
                "required": ["index", "kind", "mac", "link_up"],
                "properties": {"index": {"type": "integer", "minimum": 0},
                               "kind": {"type": "string", "enum": ["user", "tap"]},
                               "mac": {"type": "string"},
                               "link_up": {"type": "boolean"}},
                "additionalProperties": False}},
        },
        "additionalProperties": True,
    },
    "Version": {
        "type": "object",
        "required": ["pyvirt_version", "api_version"],
        "properties": {"pyvirt_version": {"type": "string"},
                       "api_version": {"type": "string"}},
        "additionalProperties": False,
    },
    "NoArguments": {"type": "object", "additionalProperties": False, "maxProperties": 0},
    "SnapshotRequest": {
        "type": "object",
        "required": ["path"],
        "properties": {"path": {
            "type": "string", "minLength": 2, "maxLength": 4096, "pattern": "^/",
            "description": "Absolute path of the snapshot directory to create.",
        }},
        "additionalProperties": False,
    },
    "NicLinkRequest": {
        "type": "object",
        "required": ["nic", "up"],
        "properties": {
            "nic": {"type": "integer", "minimum": 0, "maximum": 255,
                    "description": "The NIC's index (nics[N] of the configuration; ethN)."},
            "up": {"type": "boolean", "description": "true: link up; false: cable pulled."},
        },
        "additionalProperties": False,
    },
    "DiskOverlayRequest": {
        "type": "object",
        "required": ["disk", "path"],
        "properties": {
            "disk": {"type": "integer", "minimum": 0, "maximum": 255,
                     "description": "The disk's index (disks[N] of the configuration; vda is 0)."},
            "path": {"type": "string", "minLength": 2, "maxLength": 4096, "pattern": "^/",
                     "description": "Absolute path of the qcow2 overlay to create (it must "
                                    "not exist; beneath the snapshot root)."},
        },
        "additionalProperties": False,
    },
    "DiskOverlayResult": {
        "type": "object",
        "required": ["disk", "path", "backing"],
        "properties": {
            "disk": {"type": "integer", "minimum": 0},
            "path": {"type": "string", "description": "The new top image."},
            "backing": {"type": "string", "description": "The old top image, now its "
                                                         "read-only backing file."},
        },
        "additionalProperties": False,
    },
    "SnapshotResult": {
        "type": "object",
        "required": ["path", "memory_bytes_written", "seconds"],
        "properties": {
            "path": {"type": "string"},
            "memory_bytes_written": {"type": "integer", "minimum": 0,
                                     "description": "Guest RAM written (zero pages are not)."},
            "seconds": {"type": "number", "minimum": 0},
        },
        "additionalProperties": True,
    },
}

_RESPONSES: dict[str, Any] = {
    "BadRequest": _fault("Malformed HTTP or JSON, an unknown field (named), a wrong type, "
                         "or an argument the VMM cannot use."),
    "NotFound": _fault("No such path."),
    "MethodNotAllowed": _fault("The path exists but not with this method.", headers={
        "Allow": {"description": "The methods the path takes.",
                  "schema": {"type": "string"}}}),
    "Refused": _fault("The action is not legal in the VM's current state; nothing changed."),
    "LengthRequired": _fault("A request body must come with Content-Length "
                             "(chunked bodies are not accepted)."),
    "PayloadTooLarge": _fault("The request body is over the limit (64 KiB)."),
    "UnsupportedMediaType": _fault("A request body that is not application/json."),
    "HeadersTooLarge": _fault("The request line and headers are over the limit (16 KiB)."),
    "InternalError": _fault("The VMM failed to carry the request out (details in its log)."),
    "Busy": _fault("Too many connections are open; try again."),
    "VersionNotSupported": _fault("An HTTP version other than 1.1 (or 1.0)."),
}


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document (one shared object: do not modify it)."""
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "pyvirt VM control API",
            "version": __version__,
            "description": (
                "HTTP/1.1 with JSON bodies on the Unix socket of one VM "
                "(`pyvirt run --api-socket PATH`, mode 0600). Every error answer is a "
                "`Fault`. Besides the answers listed per operation, any request may be "
                "answered with one listed in `x-any-request-responses` (limits, "
                "malformed HTTP, unknown paths and methods)."),
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "http://localhost"}],
        "paths": {
            "/vm": {"get": {
                "summary": "Information about the VM",
                "operationId": "get_vm",
                "responses": {
                    "200": {"description": "The VM's state, configuration and uptime.",
                            "content": {_JSON: {"schema": _schema("VmInfo")}}},
                    "500": _ref("InternalError"),
                },
            }},
            "/vm/pause": _action("Pause", "Park every vCPU and pause device I/O.", "running"),
            "/vm/resume": _action("Resume", "Run a paused VM again.", "paused"),
            "/vm/power-button": _action(
                "Power button", "Press the ACPI power button: the guest shuts down cleanly "
                "if it handles the event.", "running"),
            "/vm/reset": _action("Reset", "Reset the machine in place, as the reset button "
                                 "does (RAM is kept allocated, devices are reset).",
                                 "running or paused"),
            "/vm/ctrl-alt-del": _action("Ctrl-alt-del", "Send Ctrl+Alt+Del on the i8042 "
                                        "keyboard.", "running"),
            "/vm/stop": _action("Stop", "Stop the VM at once, like pulling the plug "
                                "(force-stop).", "created, running, paused or crashed"),
            "/vm/snapshot": {"put": {
                "summary": "Snapshot the VM",
                "description": ("Write the configuration, the device and vCPU state and guest "
                                "memory to a new directory. Legal when the VM is paused; "
                                "otherwise 409."),
                "operationId": "snapshot",
                "requestBody": {"required": True, "content": {_JSON: {
                    "schema": {"$ref": "#/components/schemas/SnapshotRequest"}}}},
                "responses": {
                    "200": {"description": "The snapshot was written.", "content": {
                        _JSON: {"schema": {"$ref": "#/components/schemas/SnapshotResult"}}}},
                    "400": _ref("BadRequest"),
                    "409": _ref("Refused"),
                    "415": _ref("UnsupportedMediaType"),
                    "500": _ref("InternalError"),
                },
            }},
            "/vm/disk-overlay": {"put": {
                "summary": "Put a new qcow2 overlay on top of a disk",
                "description": ("Flush the disk, create a qcow2 image at path whose backing "
                                "file is the disk's current top image (absolute name, format "
                                "recorded), and go on writing there; the old top is kept open "
                                "read-only as its backing chain. Legal when the VM is paused; "
                                "otherwise 409. A disk the VM does not have, a read-only disk, "
                                "a path that exists or lies outside the snapshot root is a "
                                "400. Any failure leaves the old top in use and no new file."),
                "operationId": "disk_overlay",
                "requestBody": {"required": True, "content": {_JSON: {
                    "schema": {"$ref": "#/components/schemas/DiskOverlayRequest"}}}},
                "responses": {
                    "200": {"description": "The disk now writes to the overlay.", "content": {
                        _JSON: {"schema": {"$ref": "#/components/schemas/DiskOverlayResult"}}}},
                    "400": _ref("BadRequest"),
                    "409": _ref("Refused"),
                    "415": _ref("UnsupportedMediaType"),
                    "500": _ref("InternalError"),
                },
            }},
            "/vm/nic-link": {"put": {
                "summary": "Set a NIC's link state",
                "description": ("Pull a NIC's cable out (up false) or plug it back in: the "
                                "guest's driver sees the carrier change. Legal when the VM is "
                                "created, running or paused; otherwise 409. An index the VM "
                                "does not have is a 400."),
                "operationId": "set_nic_link",
                "requestBody": {"required": True, "content": {_JSON: {
                    "schema": {"$ref": "#/components/schemas/NicLinkRequest"}}}},
                "responses": {
                    "204": {"description": "Done."},
                    "400": _ref("BadRequest"),
                    "409": _ref("Refused"),
                    "415": _ref("UnsupportedMediaType"),
                    "500": _ref("InternalError"),
                },
            }},
            "/metrics": {"get": {
                "summary": "Counters and gauges in the Prometheus text format 0.0.4",
                "operationId": "get_metrics",
                "responses": {
                    "200": {"description": "vCPU exits by kind, device counters, VMM RSS, "
                                           "state and uptime.",
                            "content": {"text/plain": {"schema": {"type": "string"}}}},
                    "500": _ref("InternalError"),
                },
            }},
            "/version": {"get": {
                "summary": "The pyvirt and API versions",
                "operationId": "get_version",
                "responses": {"200": {"description": "Versions.", "content": {
                    _JSON: {"schema": {"$ref": "#/components/schemas/Version"}}}}},
            }},
            "/openapi.json": {"get": {
                "summary": "This document",
                "operationId": "get_openapi",
                "responses": {"200": {"description": "The OpenAPI 3.1 document.", "content": {
                    _JSON: {"schema": {"type": "object", "required": ["openapi", "paths"]}}}}},
            }},
        },
        "components": {"schemas": _SCHEMAS, "responses": _RESPONSES},
        "x-any-request-responses": {
            "400": _ref("BadRequest"),
            "404": _ref("NotFound"),
            "405": _ref("MethodNotAllowed"),
            "411": _ref("LengthRequired"),
            "413": _ref("PayloadTooLarge"),
            "415": _ref("UnsupportedMediaType"),
            "431": _ref("HeadersTooLarge"),
            "500": _ref("InternalError"),
            "503": _ref("Busy"),
            "505": _ref("VersionNotSupported"),
        },
    }


@functools.cache
def document_json() -> bytes:
    return json.dumps(document(), indent=1).encode()
