"""The built-in extractors: one module per family, each registering its extractors with their facts.

Every module of this package is imported by the extractor registry's discovery (fidmed.registry), which is what
registers its members; nothing lists them by hand. A new extractor is a module here (or in a plugin distribution
under the ``fidmed.plugins`` entry-point group) that calls ``EXTRACTORS.register(name, info=ExtractorInfo(...))``.

  inception_tf   the TF-FID InceptionV3 (pytorch-fid's port)
  studiogan      the study's StudioGAN backbones: inception, resnet, swav, dino, swin
  keras_apps     radfid's Keras applications: irv2, densenet, keras_inception, keras_resnet, radimagenet_*
  dgm_eval       dgm-eval's extractors beyond the study: dinov2, clip
"""
