"""OpenAI's images.edit and images.create_variation through the `openai` package: an edit with a mask (fully
transparent = paint anew) is the pipeline's inpainting with that mask, the kept part the picture's own pixels; a
picture's own transparency is its mask (DALL-E 2's reading); without either it is image to image; a variation is
image to image from no prompt. Bad input gets OpenAI-style 400s naming the field."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")

from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402
from imagine.server.app import BackgroundServer, ServerConfig, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from imagine.testing import make_tiny_model

    pipe = TextToImagePipeline.from_pretrained(make_tiny_model(tmp_path_factory.mktemp("tiny")))
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        yield pipe, srv, openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _picture() -> Image.Image:
    g = np.random.default_rng(0)
    return Image.fromarray((g.random((SIZE, SIZE, 3)) * 255).astype(np.uint8))


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


KW = dict(steps=3, seed=7)


def test_an_edit_with_a_mask_is_the_pipelines_inpainting_pasted_over_the_picture(served):
    pipe, _, client = served
    picture = _picture()
    mask = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (8, 8, 24, 20))  # fully transparent: paint anew
    res = client.images.edit(image=("p.png", _png(picture)), mask=("m.png", _png(mask)), prompt="a red circle",
                             response_format="b64_json", extra_body=KW)
    got = _decode(res.data[0].b64_json)
    white = Image.new("L", (SIZE, SIZE), 0)
    white.paste(255, (8, 8, 24, 20))
    want = pipe.generate("a red circle", init_image=picture, mask_image=white, strength=1.0, seed=7, steps=3,
                         progress=False).images[0]
    keep = np.asarray(white) == 0
    assert np.array_equal(got[keep], np.asarray(picture)[keep])  # the kept part: the picture's own pixels
    assert np.array_equal(got[~keep], np.asarray(want)[~keep])
    assert res.data[0].model_extra["seed"] == 7 and res.size == f"{SIZE}x{SIZE}"


def test_the_pictures_own_transparency_and_no_mask(served):
    pipe, _, client = served
    picture = _picture().convert("RGBA")
    holed = picture.copy()
    holed.paste((0, 0, 0, 0), (0, 0, 16, 32))
    res = client.images.edit(image=("p.png", _png(holed)), prompt="a blue square", extra_body=KW)
    white = Image.new("L", (SIZE, SIZE), 0)
    white.paste(255, (0, 0, 16, 32))
    want = pipe.generate("a blue square", init_image=holed.convert("RGB"), mask_image=white, strength=1.0, seed=7,
                         steps=3, progress=False).images[0]
    got = _decode(res.data[0].b64_json)
    assert np.array_equal(got[:, :16], np.asarray(want)[:, :16])
    # an opaque picture without a mask: redrawn whole by image to image (strength 0.75)
    res = client.images.edit(image=("p.png", _png(_picture())), prompt="a blue square", extra_body=KW)
    want = pipe.generate("a blue square", init_image=_picture(), strength=0.75, seed=7, steps=3,
                         progress=False).images[0]
    assert np.array_equal(_decode(res.data[0].b64_json), np.asarray(want))
    # a variation: image to image from no prompt, strength 0.6
    res = client.images.create_variation(image=("p.png", _png(_picture())), n=2, extra_body=KW)
    want = pipe.generate(["", ""], init_image=_picture(), strength=0.6, seeds=[7, 8], steps=3, progress=False)
    assert [np.array_equal(_decode(d.b64_json), np.asarray(w)) for d, w in zip(res.data, want.images)] == [True] * 2


def test_bad_edits_are_400s_naming_the_field(served):
    _, _, client = served
    with pytest.raises(openai.BadRequestError, match="mask: 16x16, but the image is 32x32"):
        client.images.edit(image=("p.png", _png(_picture())), mask=("m.png", _png(Image.new("RGBA", (16, 16)))),
                           prompt="x")
    with pytest.raises(openai.BadRequestError, match="give a PNG with transparency"):
        client.images.edit(image=("p.png", _png(_picture())), mask=("m.png", _png(Image.new("L", (SIZE, SIZE)))),
                           prompt="x")
    with pytest.raises(openai.BadRequestError, match="no pixel is fully transparent"):
        client.images.edit(image=("p.png", _png(_picture())), mask=("m.png", _png(Image.new("RGBA", (SIZE, SIZE),
                                                                                         (0, 0, 0, 255)))),
                           prompt="x")
    with pytest.raises(openai.BadRequestError, match="prompt: the edit's instruction is required"):
        client.images.edit(image=("p.png", _png(_picture())), prompt=" ")
    with pytest.raises(openai.BadRequestError, match="not a picture Pillow can read"):
        client.images.edit(image=("p.png", b"not a png"), prompt="x")
    with pytest.raises(openai.BadRequestError, match="response_format 'url' is not supported"):
        client.images.edit(image=("p.png", _png(_picture())), prompt="x", response_format="url")
