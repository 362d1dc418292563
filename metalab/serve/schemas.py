"""Request and response bodies of the HTTP service (pydantic), with the limits they enforce."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

MAX_TEXT_CHARS = 2000  #: one text (example or input)
MAX_LABEL_CHARS = 200
MAX_IMAGE_BASE64 = 2_000_000  #: one base64 image (about 1.5 MB of PNG/JPEG)
MAX_ARRAY_VALUES = 65536  #: one array input, flattened
MAX_EXAMPLES_PER_REQUEST = 2000
MAX_EXAMPLES_PER_ADAPTER = 10000
MAX_LABELS = 1000
MAX_PREDICT_BATCH = 256
MAX_BODY_BYTES = 16 * 1024 * 1024  #: whole request body (default of --max-body)
MAX_LEXICAL_WEIGHT = 10.0  #: beyond it the lexical classifier alone decides

Head = Literal["algorithm", "prototypes", "logistic", "ridge"]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
ImageBase64 = Annotated[str, Field(min_length=1, max_length=MAX_IMAGE_BASE64)]
Label = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]
ArrayValues = Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=1, max_length=MAX_ARRAY_VALUES)]
ARRAY_HELP = "array runs: one input as a flat list of numbers, row-major (numpy's x.ravel().tolist()), of the length /healthz's input_shape gives"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ExampleIn(Strict):
    """One labelled example: ``text`` for a text run, ``image`` (base64 PNG/JPEG) for an image run,
    ``array`` (numbers) for a run trained on an ``.npz``."""
    label: Label
    text: Optional[Text] = None
    image: Optional[ImageBase64] = Field(None, description="base64 of a PNG or JPEG file (a data: URL is accepted)")
    array: Optional[ArrayValues] = Field(None, description=ARRAY_HELP)


class AdapterCreate(Strict):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{
        "name": "banking", "examples": [{"label": "balance", "text": "what is my balance"},
                                        {"label": "balance", "text": "how much money do i have"},
                                        {"label": "transfer", "text": "send 20 dollars to mom"},
                                        {"label": "transfer", "text": "move money to savings"}]}]})
    name: str = Field(min_length=1, max_length=200)
    examples: list[ExampleIn] = Field(min_length=1, max_length=MAX_EXAMPLES_PER_REQUEST)
    labels: Optional[list[Label]] = Field(None, min_length=2, max_length=MAX_LABELS,
                                        description="Declared labels (optional; each needs ≥ 1 example). Default: the examples' labels in order of appearance.")
    head: Head = Field("algorithm", description="'algorithm': the run's own adaptation (prototypes, fitted head, MAML steps); or a head fitted on the run's features.")
    threshold: Optional[float] = Field(None, allow_inf_nan=False,
                                       description="Out-of-scope threshold on the top logit (text). Default: the run's fitted one for head 'algorithm', else none.")
    names_as_examples: bool = Field(False, description="Text: add each label, underscores read as spaces, as one more example of itself; helps when labels are words (+1.3 points on CLINC150 at 5 shots).")
    lexical_weight: float = Field(0.0, ge=0.0, le=MAX_LEXICAL_WEIGHT, allow_inf_nan=False,
                                  description="Text: add this weight times a TF-IDF n-gram classifier's log-probabilities, fitted on the examples' texts (0.1 is a good start; 0 = off).")


class ExamplesAdd(Strict):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{
        "examples": [{"label": "card", "text": "my card was declined"}, {"label": "card", "text": "block my credit card"}]}]})
    examples: list[ExampleIn] = Field(min_length=1, max_length=MAX_EXAMPLES_PER_REQUEST)


class PredictIn(Strict):
    """Exactly one of ``texts`` (text run), ``images`` (image run, base64 PNG/JPEG) or ``arrays`` (array run)."""
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"texts": ["how much is in my account", "pay my friend back"], "top_k": 3}]})
    texts: Optional[list[Text]] = Field(None, min_length=1, max_length=MAX_PREDICT_BATCH)
    images: Optional[list[ImageBase64]] = Field(None, min_length=1, max_length=MAX_PREDICT_BATCH)
    arrays: Optional[list[ArrayValues]] = Field(None, min_length=1, max_length=MAX_PREDICT_BATCH, description=ARRAY_HELP)
    top_k: Optional[int] = Field(None, ge=1, le=MAX_LABELS, description="Scores returned per input (default: all labels).")


class AdapterOut(BaseModel):
    id: str
    name: str
    modality: str
    head: str
    threshold: Optional[float]
    labels: list[str]
    examples: int
    names_as_examples: bool
    lexical_weight: float
    version: int
    created: str
    updated: str


class AdapterList(BaseModel):
    adapters: list[AdapterOut]


class PredictionOut(BaseModel):
    label: str
    scores: dict[str, float] = Field(description="Softmax probability per label, highest first.")
    out_of_scope: Optional[bool] = Field(description="Top logit under the adapter's threshold (text); null without a threshold.")


class PredictOut(BaseModel):
    adapter: str
    version: int
    predictions: list[PredictionOut]


class ErrorBody(BaseModel):
    status: int
    code: str
    message: str
    field: Optional[str] = None


class ErrorOut(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str
    run: str
    modality: str
    algorithm: str
    input_shape: list[int]
    adapters: int
