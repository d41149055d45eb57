"""Caption metrics (COCO caption evaluation: BLEU-1..4, METEOR, ROUGE-L, CIDEr) with
pycocoevalcap's scorers, over every process's predictions."""
import itertools
import json
import logging
import os
import re
import shutil
from collections import OrderedDict
from typing import Dict, List, Optional

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

__all__ = ["CaptioningEvaluator", "java_available", "simple_tokenize"]

logger = logging.getLogger(__name__)

# Removed after tokenization, as pycocoevalcap's PTBTokenizer removes them.
_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",",
                ":", "-", "--", "...", ";"}


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (PTBTokenizer and METEOR run one)."""
    return shutil.which("java") is not None


def simple_tokenize(captions: Dict) -> Dict:
    """The no-Java stand-in for PTBTokenizer, same input and output: {image_id: [{"caption":
    str}, ...]} -> {image_id: [str, ...]}. Lower-cases, splits into runs of letters/digits
    (keeping a word's "'s"-style suffix, as PTB splits "dog's" into "dog 's") and drops
    punctuation. On plain captions it agrees with PTB; it differs on e.g. "u.s." or "5.5"."""
    out = {}
    for image_id, entries in captions.items():
        out[image_id] = [" ".join(t for t in re.findall(r"[a-z0-9]+|'[a-z]+",
                                                        e["caption"].lower())
                                  if t not in _PUNCTUATION)
                         for e in entries]
    return out


def _spice_offline() -> bool:
    """SPICE runs only with Stanford CoreNLP's jars, which pycocoevalcap downloads on first
    use: used only when they are already there (these machines are offline)."""
    try:
        import pycocoevalcap.spice.spice as spice
    except ImportError:
        return False
    lib = os.path.join(os.path.dirname(spice.__file__), "lib")
    return all(os.path.isfile(os.path.join(lib, f"stanford-corenlp-3.6.0{s}.jar"))
               for s in ("", "-models"))


class CaptioningEvaluator(DatasetEvaluator):
    """Reads each output's "caption" (str) and "image_id"; scores them against the ground
    truth of the dataset metadata's ``caption_json`` (COCO caption format) and returns
    {"captioning": {"BLEU-4", "CIDEr", "METEOR", "ROUGE-L", "BLEU-1", "BLEU-2", "BLEU-3"}}.

    * Scores are pycocoevalcap's, as fractions: BLEU in [0, 1], CIDEr (CIDEr-D as
      pycocoevalcap computes it) e.g. 0.85 (papers often print 100 x that, "85.0").
    * Scored: the images with a prediction, each once (a repeated image id keeps its first
      caption, as the official Uni-Perceiver evaluation drops duplicates); ground-truth
      images without a prediction are reported in a warning, not scored (COCOEvalCap's
      convention). A predicted image id missing from the ground truth is an error.
    * Captions are tokenized with pycocoevalcap's PTBTokenizer, which runs Java; without
      Java, with `simple_tokenize` and a warning. METEOR needs Java too and is then left out;
      BLEU, ROUGE-L and CIDEr are pure Python. SPICE is added only when its Stanford CoreNLP
      jars are already installed (it downloads them otherwise).
    * With ``output_dir``, the predictions are written to
      ``captioning_results.json`` ([{"image_id", "caption"}], COCO's results format).
    * ``meteor=False`` leaves METEOR out even with Java: its Java process loads paraphrase
      tables first (many seconds on a small CPU), e.g. for quick checks.
    """

    def __init__(self, dataset_name: str, distributed: bool = True,
                 output_dir: Optional[str] = None, meteor: bool = True):
        self.dataset_name = dataset_name
        self.distributed = distributed
        self.output_dir = output_dir
        self.meteor = meteor
        self.reset()

    def reset(self):
        self._predictions: List[Dict] = []

    def process(self, inputs: List[Dict], outputs: List[Dict]):
        for x, y in zip(inputs, outputs):
            caption = y.get("caption")
            if not isinstance(caption, str):
                raise ValueError(f"{self.dataset_name}: an output's 'caption' must be a string, "
                                 f"got {caption!r}")
            image_id = y.get("image_id", x.get("image_id"))
            if image_id is None:
                raise ValueError(f"{self.dataset_name}: a caption without 'image_id'")
            self._predictions.append({"image_id": image_id, "caption": caption})

    def _ground_truth(self) -> Dict:
        from ..data.datasets.captions import caption_ground_truth

        path = caption_ground_truth(self.dataset_name)
        with PathManager.open(path) as f:
            data = json.load(f)
        gts: Dict = {}
        for ann in data.get("annotations", []):
            gts.setdefault(ann["image_id"], []).append({"caption": ann["caption"]})
        if not gts:
            raise ValueError(f"{self.dataset_name}: no captions in the ground truth {path}")
        return gts

    def evaluate(self):
        predictions = self._predictions
        if self.distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        res: Dict = {}
        for p in predictions:                         # the first caption of an image counts
            res.setdefault(p["image_id"], [{"caption": p["caption"]}])
        if len(res) < len(predictions):
            logger.info(f"{self.dataset_name}: {len(predictions) - len(res)} repeated image "
                        "id(s) ignored (first caption kept)")
        if self.output_dir:
            PathManager.mkdirs(self.output_dir)
            with PathManager.open(os.path.join(self.output_dir, "captioning_results.json"),
                                  "w") as f:
                json.dump([{"image_id": i, "caption": c[0]["caption"]} for i, c in res.items()],
                          f)
        if not res:
            logger.warning(f"{self.dataset_name}: no captions to evaluate")
            return {"captioning": {k: float("nan") for k in ("BLEU-4", "CIDEr")}}
        gts_all = self._ground_truth()
        unknown = [i for i in res if i not in gts_all]
        if unknown:
            raise ValueError(f"{self.dataset_name}: captions for image ids {unknown[:10]} that "
                             "the ground truth does not have")
        missing = len(gts_all) - len(res)
        if missing:
            logger.warning(f"{self.dataset_name}: {missing} of {len(gts_all)} ground-truth "
                           "images have no predicted caption and are not scored")
        gts = {i: gts_all[i] for i in res}
        result = self.score(gts, res, meteor=self.meteor)
        logger.info(f"{self.dataset_name}: {len(res)} images, " + ", ".join(
            f"{k} {v:.4f}" for k, v in result.items()))
        return OrderedDict(captioning=result)

    @staticmethod
    def score(gts: Dict, res: Dict, meteor: bool = True) -> "OrderedDict[str, float]":
        """{image_id: [{"caption"}, ...]} ground truth and results (one caption each) ->
        the metrics (class docstring); ``meteor``: compute METEOR when Java is there."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        java = java_available()
        if java:
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

            tokenize = PTBTokenizer().tokenize
        else:
            logger.warning("Captioning evaluation: no Java found, so captions are tokenized "
                           "with a simple regular-expression tokenizer instead of the PTB one "
                           "and METEOR is skipped; the scores are close to, not equal to, "
                           "the COCO caption evaluation's")
            tokenize = simple_tokenize
        gts_tok, res_tok = tokenize(gts), tokenize(res)
        scores: Dict[str, float] = {}
        bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
        for n, value in enumerate(bleu, start=1):
            scores[f"BLEU-{n}"] = float(value)
        scores["CIDEr"] = float(Cider().compute_score(gts_tok, res_tok)[0])
        scores["ROUGE-L"] = float(Rouge().compute_score(gts_tok, res_tok)[0])
        if java and meteor:
            from pycocoevalcap.meteor.meteor import Meteor

            scorer = Meteor()   # a Java process, ended when the object is collected
            scores["METEOR"] = float(scorer.compute_score(gts_tok, res_tok)[0])
            del scorer
            if _spice_offline():
                from pycocoevalcap.spice.spice import Spice

                try:
                    scores["SPICE"] = float(Spice().compute_score(gts_tok, res_tok)[0])
                except Exception as e:  # its Java side has more needs (a cache dir, memory)
                    logger.warning(f"SPICE failed and is left out: {e}")
        order = ["BLEU-4", "CIDEr", "METEOR", "ROUGE-L", "SPICE", "BLEU-1", "BLEU-2", "BLEU-3"]
        return OrderedDict((k, scores[k]) for k in order if k in scores)
