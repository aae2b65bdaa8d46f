"""The few-shot task family (``task.name=fewshot``), one module per algorithm.

The rule every algorithm follows: **explain what the model itself uses to decide.** An
algorithm turns one episode's support embeddings into an
:class:`~experiments.tasks.fewshot.episodes.EpisodeClassifier` (the references the
explainers receive, the similarity explained, the class probabilities the metrics read),
and one evaluation, :class:`~experiments.tasks.fewshot.episodes.EpisodeEvaluation`,
explains every algorithm from it; one accuracy,
:func:`~experiments.tasks.fewshot.episodes.episode_accuracy`, scores every algorithm.

Modules:

- ``family``: :class:`FewShot` and :class:`FewShotConfig` (``conf/task/fewshot.yaml``);
- ``algorithm``: the :class:`FewShotAlgorithm` contract, the registry ``ALGORITHMS`` and
  :func:`register_algorithm`;
- ``episodes``: drawing episodes, the classifier, the evaluation and the accuracy;
- ``protonet``, ``matchingnet``, ``relationnet``, ``simpleshot``: one algorithm each,
  with its training module (a ``TaskModule``) and its own option checks.

**Adding an algorithm** touches one Python module and the task YAML. In the module,
subclass :class:`FewShotAlgorithm` and decorate it with :func:`register_algorithm`::

    @register_algorithm
    class CosineToPrototype(FewShotAlgorithm):
        name = "cosine_prototype"          # task.algorithm=cosine_prototype
        similarity_name = "cosine"
        options = ("temperature",)         # the algorithm-specific keys it reads

        @classmethod
        def check_options(cls, config): ...  # FamBenchError on a bad value
        def training_module(self, model, train_set, optim): ...  # a TaskModule
        def classifier(self, support, n_way, n_shot): ...        # an EpisodeClassifier

then select it with ``task.algorithm=cosine_prototype`` (in ``conf/task/fewshot.yaml``,
an experiment file or on the command line) once the module is imported (the Python
API), or with ``task.algorithm=<module>.<Class>``, which imports the module on the way.
Optional methods: ``train_loader`` (default: the family's episodes), ``prepare``
(statistics of the training split), ``to`` (learned modules to the device),
``task_state``/``load_task_state``/``requires_task_state`` (learned state saved beside
the weights as ``<weights>.task.pt``), ``reads`` (options read depending on others).
Every algorithm's option checks run when the task config is built, before anything
trains.
"""

from experiments.tasks.fewshot.algorithm import (
    ALGORITHMS,
    FewShotAlgorithm,
    algorithm_class,
    register_algorithm,
)
from experiments.tasks.fewshot.episodes import (
    EpisodeClassifier,
    EpisodeEvaluation,
    episode_accuracy,
    episode_sampler,
)
from experiments.tasks.fewshot.family import FewShot, FewShotConfig
from experiments.tasks.fewshot.matchingnet import MatchingNet
from experiments.tasks.fewshot.protonet import ProtoNet
from experiments.tasks.fewshot.relationnet import RelationNet
from experiments.tasks.fewshot.simpleshot import SimpleShot

__all__ = [
    "ALGORITHMS",
    "EpisodeClassifier",
    "EpisodeEvaluation",
    "FewShot",
    "FewShotAlgorithm",
    "FewShotConfig",
    "MatchingNet",
    "ProtoNet",
    "RelationNet",
    "SimpleShot",
    "algorithm_class",
    "episode_accuracy",
    "episode_sampler",
    "register_algorithm",
]
