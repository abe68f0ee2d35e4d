"""A local web page for editing images: ``python -m ip2p.webui [--checkpoint X] [--port 7860]``.

Open the address it prints, choose an image, type an instruction and press Edit. The page has the controls of the
paper's own app: sampling steps, the two guidance scales (``s_T`` text, ``s_I`` image), the seed, "random seed" and
"random CFG" (``s_T`` in 6..9, ``s_I`` in 1.2..1.8, as ``infer.py --randomize-cfg``). Each result shows the settings
that made it (``infer.py`` with them gives the same picture) and can be edited further. One model serves every
browser tab; edits run one at a time, and up to ``MAX_PENDING_EDITS`` (8) are taken at once: more are answered 503,
to try again. Only the Python standard library serves it: nothing to install.

The page talks to a small JSON API, which scripts may use too:

- ``GET /``: the page; ``GET /info``: the checkpoint, the sampler and the defaults.
- ``POST /edit`` (``Content-Type: application/json``; other types, which a page of another site may send without
  the browser asking first, are answered 415) with ``{"image": a data URL or base64 of an image file,
  "instruction": "...", "steps": 50, "text_guidance": 7.5, "image_guidance": 1.5, "seed": null (random) or an
  integer, "randomize_cfg": false, "resolution": 512}`` (all but the image and the instruction optional) answers
  ``{"image": a PNG data URL, "instruction", "seed", "text_guidance", "image_guidance", "steps", "scheduler",
  "resolution", "size", "low_memory", "seconds"}`` (and ``"warning"`` when the instruction is longer than the text
  encoder reads); a bad request answers 4xx with ``{"error": one line saying what was wrong}``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import logging
import math
import random
import secrets
import sys
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger("ip2p.webui")

MAX_REQUEST_BYTES = 64 * 1024 * 1024
"""Largest request body accepted (an image as base64 is 4/3 of its file)."""
MAX_PENDING_EDITS = 8
"""Edits taken at once (one runs, the others wait for it): each holds its upload and decoded image, so more are
answered 503 (their body read past in small chunks, not kept), which bounds the server's memory however many
clients post."""
MAX_STEPS = 1000
MAX_INSTRUCTION_CHARS = 2000


class RequestError(ValueError):
    """A request the editor cannot serve; the message says what was wrong and how to fix it."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


def _number(request: dict, key: str, default: float, *, integer: bool = False, low: float | None = None,
            high: float | None = None) -> Any:
    value = request.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{key}={value!r} must be {'an integer' if integer else 'a number'}")
    # float() of an int past 1e308 overflows (and so does math.isfinite); Python compares ints with floats exactly.
    if abs(value) > sys.float_info.max and not integer or isinstance(value, float) and not math.isfinite(value):
        raise RequestError(f"{key}={value!r} must be a finite number")
    if integer and isinstance(value, float) and not value.is_integer():
        raise RequestError(f"{key}={value!r} must be an integer")
    if low is not None and value < low:
        raise RequestError(f"{key}={value!r} must be at least {low}")
    if high is not None and value > high:
        raise RequestError(f"{key}={value!r} must be at most {high}")
    return int(value) if integer else float(value)


def _image_bytes(value: Any) -> bytes:
    if not isinstance(value, str) or not value:
        raise RequestError("image is missing; send the image file as a data URL or base64 text")
    text = value.partition(",")[2] if value.startswith("data:") else value
    try:  # without the line breaks of `base64 in.png` (and MIME), which validate=True refuses
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("image is not valid base64; send the image file as a data URL or base64 text") from None


class EditorService:
    """Edits requests with one loaded editor (``ip2p.models.EditorModel``), one at a time."""

    def __init__(self, model: Any, *, checkpoint: str = "", scheduler: str | None = None, steps: int | None = None,
                 text_guidance: float | None = None, image_guidance: float | None = None, resolution: int = 512,
                 max_pixels: int | None = None) -> None:
        from ip2p.images import DEFAULT_MAX_PIXELS
        from ip2p.sampling import (
            DEFAULT_IMAGE_GUIDANCE,
            DEFAULT_STEPS,
            DEFAULT_TEXT_GUIDANCE,
            check_steps,
            default_scheduler,
            make_scheduler,
        )

        self.model = model
        self.checkpoint = checkpoint
        self.scheduler_name = scheduler or default_scheduler(model.scheduler.config.get("prediction_type"))
        self.scheduler = make_scheduler(self.scheduler_name, model.scheduler.config)
        self.defaults = {"steps": steps or DEFAULT_STEPS,
                         "text_guidance": DEFAULT_TEXT_GUIDANCE if text_guidance is None else text_guidance,
                         "image_guidance": DEFAULT_IMAGE_GUIDANCE if image_guidance is None else image_guidance,
                         "resolution": resolution}
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self.multiple = int(model.vae_scale_factor)
        # Defaults that no edit can use fail now, as the server starts, rather than in every edit from the page.
        check_steps(self.scheduler, self.defaults["steps"])
        self._check_resolution(resolution)
        self._lock = threading.Lock()
        self._draws = random.SystemRandom()

    def info(self) -> dict[str, Any]:
        from ip2p.inference import RANDOM_IMAGE_GUIDANCE, RANDOM_TEXT_GUIDANCE

        return {"checkpoint": self.checkpoint, "scheduler": self.scheduler_name, "multiple": self.multiple,
                "device": str(self.model.device), "low_memory": self.model.unet_batch is not None,
                "defaults": self.defaults, "random_text_guidance": list(RANDOM_TEXT_GUIDANCE),
                "random_image_guidance": list(RANDOM_IMAGE_GUIDANCE)}

    def _check_resolution(self, resolution: int) -> None:
        """Refuse a resolution below the VAE's factor (0 keeps the image's size); a ``RequestError`` is a ValueError,
        so one check serves the server's defaults at start and each request."""
        if 0 < resolution < self.multiple:
            raise RequestError(f"resolution={resolution} is below {self.multiple}; give at least {self.multiple}, "
                               "or 0 to keep the image's size")

    def edit(self, request: Any) -> dict[str, Any]:
        """Serve one ``POST /edit`` body (already parsed JSON); raises ``RequestError`` for a bad one."""
        import torch

        from ip2p import images as img
        from ip2p.inference import check_finite, check_text, draw_cfg, warn_if_truncated
        from ip2p.sampling import check_steps, edit

        if not isinstance(request, dict):
            raise RequestError("the request must be a JSON object with image and instruction")
        instruction = request.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise RequestError("instruction is missing or empty; say what to change, e.g. 'make it winter'")
        try:
            check_text(instruction, "instruction")
        except ValueError as e:
            raise RequestError(str(e)) from None
        if len(instruction) > MAX_INSTRUCTION_CHARS:
            raise RequestError(f"instruction has {len(instruction)} characters; keep it under "
                               f"{MAX_INSTRUCTION_CHARS}")
        truncated = warn_if_truncated(self.model.tokenizer, instruction)
        d = self.defaults
        steps = _number(request, "steps", d["steps"], integer=True, low=1, high=MAX_STEPS)
        try:
            check_steps(self.scheduler, steps)
        except ValueError as e:
            raise RequestError(str(e)) from None
        resolution = _number(request, "resolution", d["resolution"], integer=True, low=0, high=16384)
        self._check_resolution(resolution)
        seed = request.get("seed")
        seed = secrets.randbelow(2**31) if seed is None else _number(request, "seed", 0, integer=True, low=0,
                                                                      high=2**64 - 1)
        randomize_cfg = request.get("randomize_cfg")
        if randomize_cfg is not None and not isinstance(randomize_cfg, bool):  # "false" is truthy
            raise RequestError(f"randomize_cfg={randomize_cfg!r} must be true or false")
        if randomize_cfg:
            text_guidance, image_guidance = draw_cfg(self._draws)
        else:
            text_guidance = _number(request, "text_guidance", d["text_guidance"])
            image_guidance = _number(request, "image_guidance", d["image_guidance"])
        try:
            source = img.decode_image(_image_bytes(request.get("image")), name="the uploaded image",
                                      max_pixels=self.max_pixels)
            resized = img.resize_for_model(source, resolution, self.multiple, max_pixels=self.max_pixels)
        except ValueError as e:  # ImageError, or a resolution over the pixel limit
            raise RequestError(str(e)) from None
        started = time.perf_counter()
        with self._lock:
            out = edit(self.model, img.images_to_batch([resized]), [instruction], steps=steps,
                       text_guidance=text_guidance, image_guidance=image_guidance, scheduler=self.scheduler,
                       generator=torch.Generator().manual_seed(seed), progress=False)
        try:
            check_finite(out, text_guidance, image_guidance, self.model.dtype, scales="the guidance scales")
        except ValueError as e:
            raise RequestError(str(e)) from None
        result = img.tensor_to_images(out)[0]
        seconds = time.perf_counter() - started
        buffer = io.BytesIO()
        result.save(buffer, format="PNG")
        logger.info("edited %dx%d in %.1f s: %r (s_T=%g, s_I=%g, seed %d, %d steps)", *result.size, seconds,
                    instruction, text_guidance, image_guidance, seed, steps)
        return {"image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"),
                "instruction": instruction, "seed": seed, "text_guidance": text_guidance,
                "image_guidance": image_guidance, "steps": steps, "scheduler": self.scheduler_name,
                "low_memory": self.model.unet_batch is not None,
                "resolution": resolution, "size": list(result.size), "seconds": round(seconds, 2),
                **({"warning": truncated} if truncated else {})}


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "ip2p-webui"
    protocol_version = "HTTP/1.1"
    timeout = 120  # seconds a client may stall mid-request before its connection (and thread) is dropped

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug("%s %s", self.address_string(), format % args)

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionError:  # reset mid-upload or while kept alive: socketserver would print a traceback for it
            self.close_connection = True
            logger.debug("%s reset its connection", self.address_string())

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        try:
            self.end_headers()
            if self.command != "HEAD":  # HEAD: GET's status and headers (Content-Length included), no body
                self.wfile.write(body)
        except ConnectionError:  # the client left (a tab closed mid-edit): no one to answer, nothing went wrong here
            self.close_connection = True
            logger.debug("%s left before its answer", self.address_string())

    def _json(self, status: HTTPStatus, value: dict) -> None:
        self._send(status, json.dumps(value).encode("utf-8"), "application/json")

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json(status, {"error": message})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's answer to a request it cannot parse or route (a garbled request line, a method other than
        GET and POST, too long a line or too many headers), as one-line JSON instead of an HTML page."""
        self.close_connection = True
        text = " ".join((message or self.responses.get(code, ("error",))[0]).split())
        if code == HTTPStatus.NOT_IMPLEMENTED and self.command:
            text = f"method {self.command} is not supported; GET (or HEAD) / or /info, POST /edit"
        body = json.dumps({"error": text}).encode("utf-8")
        self.send_response(code)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        path = self.path.partition("?")[0]
        if self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a body is not read: left in the stream, it would be the next "request"
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.encode("utf-8"), "text/html; charset=utf-8")
        elif path == "/info":
            service = self.server.service
            if service is None:
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, "the model is still loading; try again in a moment")
            else:
                self._json(HTTPStatus.OK, service.info())
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no page {path!r}; the editor is at /")

    do_HEAD = do_GET  # noqa: N815 - the base class's name; _send leaves the body out

    def do_POST(self) -> None:  # noqa: N802 - the base class's name
        path = self.path.partition("?")[0]
        length = self.headers.get("Content-Length")
        if path != "/edit":
            self.close_connection = True
            self._error(HTTPStatus.NOT_FOUND, f"no endpoint {path!r}; POST edits to /edit")
            return
        if length is None or not (length.isascii() and length.isdigit()):  # int() fails on e.g. '\xb2' ('²')
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "the request needs a Content-Length header")
            return
        if "Transfer-Encoding" in self.headers:  # it overrides Content-Length (RFC 9112), and is not read here
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, "send the request with a Content-Length header and no "
                        "Transfer-Encoding (the body is not chunked)")
            return
        digits = length.lstrip("0") or "0"  # int() refuses over 4300 digits: any 20 are far over the limit
        if len(digits) > 20 or int(digits) > MAX_REQUEST_BYTES:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            size = digits if len(digits) <= 20 else f"a {len(digits)}-digit number of"
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request is {size} bytes, over the limit of "
                        f"{MAX_REQUEST_BYTES}; send a smaller image")
            return
        if self.headers.get("Content-Type", "").partition(";")[0].strip().lower() != "application/json":
            self.close_connection = True
            self._discard(int(digits))  # read past (not kept): a client still uploading would see a reset otherwise
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the edit as JSON with Content-Type: application/json "
                        "(other types are refused: a page of another site could send them without the browser asking)")
            return
        if not self.server.pending.acquire(blocking=False):
            self.close_connection = True
            # Read the body past, a chunk at a time (nothing is kept): closing with it unread would reset the
            # connection, and a client still uploading (any image of a few MB) would see that instead of this answer.
            self._discard(int(digits))
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"the editor already has {self.server.pending_limit} edits in "
                        "hand (they run one at a time); try again when one is done")
            return
        try:
            self._edit(self.rfile.read(int(digits)))
        finally:
            self.server.pending.release()

    def _discard(self, length: int) -> None:
        """Read ``length`` bytes of body past, a chunk at a time, keeping none."""
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                return
            length -= len(chunk)

    def _edit(self, body: bytes) -> None:
        service = self.server.service
        if service is None:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "the model is still loading; try again in a moment")
            return
        try:
            request = json.loads(body)
        except (ValueError, RecursionError) as e:  # also an int of over 4300 digits, arrays nested too deep
            self._error(HTTPStatus.BAD_REQUEST, f"the request is not JSON ({' '.join(str(e).split())}); send a JSON "
                        "object")
            return
        try:
            result = service.edit(request)
        except RequestError as e:
            self._error(e.status, str(e))
            return
        except Exception as e:  # the server keeps serving; the page shows the reason
            logger.exception("edit failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"the edit failed: {type(e).__name__}: "
                        f"{' '.join(str(e).split())}")
            return
        self._json(HTTPStatus.OK, result)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    service: EditorService | None = None
    pending_limit: int
    pending: threading.BoundedSemaphore


def make_server(host: str = "127.0.0.1", port: int = 7860, service: EditorService | None = None) -> _Server:
    """Bind the web UI's HTTP server (``port=0``: any free port); ``server.service`` may be set later, requests
    before that are told the model is loading. Run it with ``serve_forever()``."""
    server = _Server((host, port), _Handler)
    server.service = service
    server.pending_limit = MAX_PENDING_EDITS
    server.pending = threading.BoundedSemaphore(MAX_PENDING_EDITS)
    return server


def build_parser() -> argparse.ArgumentParser:
    from ip2p.images import DEFAULT_MAX_PIXELS
    from ip2p.inference import add_model_arguments

    parser = argparse.ArgumentParser(prog="python -m ip2p.webui", description="A local web page for editing images.")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 shares it with "
                             "the network, with no authentication)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s; 0: any free one)")
    parser.add_argument("--steps", type=int, default=None, help="the page's default steps (default: 50)")
    parser.add_argument("--text-guidance", type=float, default=None, help="the page's default s_T (default: 7.5)")
    parser.add_argument("--image-guidance", type=float, default=None, help="the page's default s_I (default: 1.5)")
    parser.add_argument("--resolution", type=int, default=512,
                        help="the page's default long side (0 keeps the input size; default: %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ip2p.inference import load_model

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} must be between 0 and 65535")
    if args.steps is not None and not 1 <= args.steps <= MAX_STEPS:
        parser.error(f"--steps {args.steps} must be between 1 and {MAX_STEPS}")
    for flag, value in (("--text-guidance", args.text_guidance), ("--image-guidance", args.image_guidance)):
        if value is not None and not math.isfinite(value):
            parser.error(f"{flag} {value} must be a finite number")
    if args.resolution < 0 or args.max_pixels < 1:
        parser.error("--resolution must be >= 0 (0 keeps the input size) and --max-pixels >= 1")
    try:
        # Listen first: a port in use fails at once, not after minutes of loading Stable Diffusion.
        server = make_server(args.host, args.port)
    except OSError as e:
        logger.error("error: cannot listen on %s:%d (%s); pass another --port or --host", args.host, args.port,
                     e.strerror or e)
        return 2
    try:
        logger.info("loading %s", args.checkpoint)
        model = load_model(args)
        label = str(args.checkpoint) + (f" + LoRA {args.lora}" if args.lora else "")
        server.service = EditorService(model, checkpoint=label, scheduler=args.scheduler,
                                       steps=args.steps, text_guidance=args.text_guidance,
                                       image_guidance=args.image_guidance, resolution=args.resolution,
                                       max_pixels=args.max_pixels)
    except (ValueError, FileNotFoundError) as e:
        server.server_close()
        logger.error("error: %s", e)
        return 2
    host, port = server.server_address[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    logger.info("ip2p web UI ready: open http://%s:%d/ (Ctrl-C stops it)", shown, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("stopped")
    finally:
        server.server_close()
    return 0


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>ip2p: edit an image by instruction</title>
<style>
 body{font-family:system-ui,sans-serif;margin:0;background:#f6f6f4;color:#222}
 header{padding:12px 20px;background:#23395b;color:#fff}header h1{margin:0;font-size:20px}
 header p{margin:4px 0 0;font-size:13px;opacity:.85}
 main{display:grid;grid-template-columns:minmax(280px,360px) 1fr;gap:20px;padding:20px}
 @media (max-width:800px){main{grid-template-columns:1fr}}
 form{background:#fff;padding:16px;border-radius:8px;box-shadow:0 1px 3px #0002}
 label{display:block;font-size:13px;margin:10px 0 3px;color:#444}
 input[type=text],input[type=number]{width:100%;box-sizing:border-box;padding:6px;font-size:14px}
 .row{display:flex;gap:10px}.row>div{flex:1}.check{display:flex;gap:6px;align-items:center;margin-top:8px}
 .check label{margin:0}button{margin-top:14px;padding:9px 16px;font-size:15px;border:0;border-radius:6px;
 background:#23395b;color:#fff;cursor:pointer}button:disabled{opacity:.5;cursor:wait}
 .panes{display:grid;grid-template-columns:1fr 1fr;gap:16px}
 figure{margin:0;background:#fff;padding:10px;border-radius:8px;box-shadow:0 1px 3px #0002}
 figure img{max-width:100%;display:block;margin:auto;image-rendering:auto}figcaption{font-size:13px;margin-top:6px}
 #error{color:#b00020;font-size:14px;margin-top:10px;white-space:pre-wrap}#status{font-size:13px;margin-top:8px}
 a.small,button.small{font-size:13px;margin-right:10px}button.small{padding:4px 8px;margin-top:6px}
</style></head><body>
<header><h1>ip2p &mdash; edit an image by instruction</h1>
<p id="model">InstructPix2Pix: s_T follows the instruction, s_I stays close to the input image.</p></header>
<main>
<form id="form">
 <label for="file">Input image</label><input id="file" type="file" accept="image/*">
 <label for="instruction">Instruction</label>
 <input id="instruction" type="text" placeholder="e.g. make it winter" autocomplete="off">
 <div class="row"><div><label for="steps">Steps</label><input id="steps" type="number" min="1" max="1000"></div>
 <div><label for="resolution">Resolution (0: as is)</label><input id="resolution" type="number" min="0"></div></div>
 <div class="row"><div><label for="text_guidance">Text CFG s_T</label>
 <input id="text_guidance" type="number" step="0.1"></div>
 <div><label for="image_guidance">Image CFG s_I</label><input id="image_guidance" type="number" step="0.05"></div></div>
 <div class="check"><input id="randomize_cfg" type="checkbox"><label for="randomize_cfg">Random CFG
 (s_T 6&ndash;9, s_I 1.2&ndash;1.8)</label></div>
 <label for="seed">Seed</label><input id="seed" type="number" min="0" max="9007199254740991">
 <div class="check"><input id="randomize_seed" type="checkbox" checked><label for="randomize_seed">Random seed
 </label></div>
 <button id="go" type="submit">Edit</button>
 <div id="status"></div><div id="error"></div>
 <p style="font-size:12px;color:#555">Not changing enough? Lower s_I or raise s_T. Changing too much? Raise s_I or
 lower s_T. Try other seeds, or rephrase the instruction.</p>
</form>
<section class="panes">
 <figure><img id="input" alt=""><figcaption>input</figcaption></figure>
 <figure><img id="output" alt=""><figcaption id="caption">the edit appears here</figcaption>
 <a id="download" class="small" download="edited.png" hidden>download</a>
 <button id="again" class="small" type="button" hidden>edit this result further</button></figure>
</section></main>
<script>
const $ = id => document.getElementById(id);
let inputData = null;
fetch('/info').then(r => r.json()).then(info => {
  if (info.error) return;
  for (const k of ['steps', 'text_guidance', 'image_guidance', 'resolution']) $(k).value = info.defaults[k];
  $('model').textContent = 'model: ' + info.checkpoint + ' \\u00b7 sampler: ' + info.scheduler + ' \\u00b7 ' +
    info.device + (info.low_memory ? ' \\u00b7 low memory' : '');
});
$('file').addEventListener('change', () => {
  const f = $('file').files[0]; if (!f) return;
  const reader = new FileReader();
  reader.onload = () => { inputData = reader.result; $('input').src = inputData; };
  reader.readAsDataURL(f);
});
$('again').addEventListener('click', () => { inputData = $('output').src; $('input').src = inputData; });
const num = id => $(id).value === '' ? null : Number($(id).value);
$('form').addEventListener('submit', async ev => {
  ev.preventDefault(); $('error').textContent = '';
  if (!inputData) { $('error').textContent = 'Choose an input image first.'; return; }
  const body = {image: inputData, instruction: $('instruction').value, steps: num('steps'),
    resolution: num('resolution'), text_guidance: num('text_guidance'), image_guidance: num('image_guidance'),
    randomize_cfg: $('randomize_cfg').checked, seed: $('randomize_seed').checked ? null : num('seed')};
  $('go').disabled = true; $('status').textContent = 'editing\\u2026'; const t0 = Date.now();
  try {
    const r = await fetch('/edit', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                    body: JSON.stringify(body)});
    const out = await r.json();
    if (!r.ok) { $('error').textContent = out.error || ('HTTP ' + r.status); return; }
    $('output').src = out.image; $('download').href = out.image; $('download').hidden = false;
    $('again').hidden = false;
    for (const k of ['seed', 'text_guidance', 'image_guidance']) $(k).value = out[k];
    $('caption').textContent = '"' + out.instruction + '": s_T=' + out.text_guidance + ', s_I=' +
      out.image_guidance + ', seed ' + out.seed + ', ' + out.steps + ' ' + out.scheduler + ' steps, resolution ' +
      out.resolution + ', ' + out.size.join('x') + ' (' + out.seconds + ' s)';
    if (out.warning) $('error').textContent = 'Note: ' + out.warning;
  } catch (e) { $('error').textContent = 'The server did not answer (' + e + '); is it still running?'; }
  finally { $('go').disabled = false; $('status').textContent = ''; }
});
</script></body></html>
"""


if __name__ == "__main__":
    sys.exit(main())
