"""The experiments of the book's chapters, apart from the reusable library (`kdbook.losses`, `kdbook.metrics`,
`kdbook.data`, `kdbook.augment`, `kdbook.models`, `kdbook.engine`, `kdbook.packing`, `kdbook.train`,
`kdbook.store`, `kdbook.costs`, `kdbook.viz`, `kdbook.checks`).

One module per chapter, exported from its notebook: `mnist` (§4.1), `gan` (§4.2's SN-GAN), `zoo` (the shared teacher
zoo and §4.2's synthetic-data students), `policies` (§5.1), `recycling` (§5.2), `train_agreement` (§6.1),
`landscape` (§6.2), `findings` (§7), `ensembles` (appendix B) and `capacity` (appendix C). They use the library;
the library never imports them.
"""
