"""MOHO-style single-image reconstruction of the held object (image-conditioned SDF).

Its meshes are rendered with ``occmllm.render`` under the names ``occmllm.records.render_path``
gives, which the stage-4 records and chain-of-thought inference read.
"""
