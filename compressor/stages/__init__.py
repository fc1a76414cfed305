"""The techniques, one stage each, in the order they run: removal, sparse-token filter, sharing,
equalization, quantization.

Every stage module has the same three plain functions:

    measure(model, recipe, analysis, run) -> record   what the stage needs to know, on the model it will change
    decide(recipe, analysis, plan) -> plan entries    pure: the stage's part of the plan, from its record
    apply(model, plan, run, record=None) -> Applied   the model with the stage's part applied

and the names it uses: SECTION (its recipe section), PART (its section of plan.json) and RECORD
(its record in analysis.json). `compressor.pipeline` runs them in STAGES order, each on the model
the earlier stages produced. Adding a technique means adding one module here and one recipe section.
"""

from compressor.stages import equalization, quantization, removal, sharing, sparse_tokens

STAGES = (removal, sparse_tokens, sharing, equalization, quantization)


def named_by(recipe) -> list:
    """The stages whose recipe section is present, in running order."""
    return [stage for stage in STAGES if getattr(recipe, stage.SECTION) is not None]
