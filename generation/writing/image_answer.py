"""One image in, one answer out: `generate_for_image(image, index_dir, vlm_dir)`, the entry point of `cxr generate`,
`cxr demo` and the draft report.

The image is a path (PNG/JPEG/DICOM) or an array. An image that is itself in the index (by its path, or a DICOM by its
StudyInstanceUID) never retrieves its own study or patient as an exemplar. `[identify]` / `[ground]` answers come from
the VLM folder's trained detector when it has one, `[segment]` from its segment head. A fine-tuned pretrained VLM's
folder (`cxr vlm train --base-vlm`) is answered by `image_text_to_text.answer_image`, so `cxr generate` calls one
function for both kinds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from generation.data.rag import Exemplar, indexed_study
from generation.heads.segment_head import segment_record
from generation.writing.generate import DETECTOR_TASKS, SEGMENT_TASK, Generator, task_prompt
from generation.writing.generator_options import GeneratorOptions


def generate_for_image(
    image: str | Path | np.ndarray,
    index_dir: str | Path | None,
    vlm_dir: str | Path,
    task: str = "report",
    k: int = 3,
    question: str | None = None,
    phrase: str | None = None,
    generator: Generator | None = None,
    retrieval_model: Any = None,
    exclude_study: str | None = None,
    exclude_patient: str | None = None,
    options: GeneratorOptions | None = None,
    device: str | None = None,
    decoding: dict | None = None,
) -> dict:
    """Image path (PNG/JPEG/DICOM) or HxW array -> {text, task, prompt, exemplars, boxes?}.

    `index_dir=None` or `k=0` generates without retrieval. Exemplars never come from `exclude_study` /
    `exclude_patient`; for an image file that is in the index (by its path, or a DICOM by its StudyInstanceUID),
    those default to its own study and patient.
    `retrieval_model` defaults to the model recorded in the index's index_info.json; pass a loaded one (or a
    `generator`) to reuse it across calls. `options`: where each answer comes from (`GeneratorOptions`; its
    `report_source` "findings", the default, writes the report from the finding head's findings and the exemplars'
    sentences, "generate" is the LM's draft ("generate-filtered": from only the exemplars whose findings the head
    also predicts), "quote" the exemplar the finding head ranks first). `task="segment"` (with `phrase`, the
    region) is answered by the VLM folder's segment head: region, polygons and RLE.
    `device`: None / "auto" (CUDA when present), "cpu", "cuda:N". `decoding`: the `Generator`'s per-task decoding
    controls (e.g. `report_decoding(contrast, drafts)`).
    """
    prompt = task_prompt(task, question, phrase)
    if generator is None:
        from generation.writing.image_text_to_text import answer_image, is_image_text_to_text

        if is_image_text_to_text(vlm_dir):  # a fine-tuned pretrained VLM (`cxr vlm train --base-vlm`)
            return answer_image(image, vlm_dir, task, prompt, k, index_dir, device, retrieval_model)
    gen = generator or Generator(
        vlm_dir,
        index_dir if k > 0 else None,
        retrieval_model=retrieval_model,
        options=options,
        device=device,
        decoding=decoding,
    )
    if task == SEGMENT_TASK:  # the segment head alone answers: no exemplars, no LM
        image, _ = image_and_exemplars(gen, image, 0, exclude_study, exclude_patient)
        return segment_record(gen.segment_head, gen.visual([image]), prompt, image.shape)
    image, exemplars = image_and_exemplars(gen, image, k, exclude_study, exclude_patient)
    answer = gen.generate(gen.visual([image]), [task], [prompt], exemplars)[0]
    if task in DETECTOR_TASKS:
        answer = detector_answer(answer, gen.detector, image, task, phrase)
    return answer


def detector_answer(answer: dict, detector: Any, image: np.ndarray, task: str, phrase: str | None) -> dict:
    """`answer` with its boxes from a trained `detector` (generation/heads/detector.py) for `[identify]`, and for
    `[ground]` of a label the detector knows; unchanged for another task, without a detector, or for a phrase it has no
    class for."""
    if task not in DETECTOR_TASKS or detector is None:
        return answer
    from generation.data.boxes import boxes_text

    if task == "identify":
        detections = detector.predict([image])[0]
        boxes = detector.answer(detections)
    else:
        boxes, detections = detector.ground([image], [phrase or ""])[0], None
        if boxes is None:
            return answer
    out = {**answer, "boxes": boxes, "text": boxes_text(task, boxes), "source": "detector", "malformed_boxes": 0}
    if detections is not None:
        out["detections"] = detections
    return out


def image_and_exemplars(
    gen: Generator, image: str | Path | np.ndarray, k: int, exclude_study: str | None, exclude_patient: str | None
) -> tuple[np.ndarray, list[list[Exemplar]]]:
    """The image as an array and its top-k exemplars ([[]] without retrieval), never from the image's own study or
    patient when the image is in the index (see `generate_for_image`)."""
    if isinstance(image, str | Path):
        from retrieval.data.image_io import read_image

        if gen.searcher is not None and exclude_study is None and exclude_patient is None:
            # An image that is itself in the index never retrieves its own study or patient.
            exclude_study, exclude_patient = indexed_study(gen.searcher.index.meta, image)
        image = read_image(image)
    exemplars: list[list[Exemplar]] = [[]]
    if k > 0 and gen.searcher is not None:
        exemplars = gen.exemplars_for_images([image], k, [exclude_study], [exclude_patient])
    return image, exemplars
