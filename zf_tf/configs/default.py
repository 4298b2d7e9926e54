"""Default config: ZFNet scaled down for a 2-core CPU, on the embedded `zf_shapes` dataset.

Run:  python main.py --mode=train --strategy=mirrored        (this config is the default)
      python main.py --mode=train --config=configs/default.py --config.train.epochs=2

The dataset is generated on first use (no download) into `data.data_dir`.

Differences from the paper (configs/zfnet_imagenet.py keeps the paper's values), and why:
- input 64 px crops of 72 px images (paper: 224 of 256) and width 0.25 (24..96 conv maps,
  1024-unit fc layers) so an epoch takes seconds on 2 cores; the topology and layer names
  are the paper's;
- He-normal initialisation instead of N(0, 0.01): with few epochs and no batch norm, the
  paper's initialisation learns very slowly in an 8-layer net;
  He-normal assumes unit-variance inputs, so the model scales the mean-subtracted pixels
  by 1/64 first (`model.input_scale`; the paper's is 1).
"""

import ml_collections

# ImageNet per-channel RGB means, used as "the mean" for every dataset unless overridden.
IMAGENET_MEAN = (123.68, 116.78, 103.94)


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Shared by data and model: overriding either side changes both.
    crop_size = ml_collections.FieldReference(64)
    num_classes = ml_collections.FieldReference(10)

    config.data = ml_collections.ConfigDict()
    # 'embedded' (generated zf_shapes), 'tfds' (any tfds image dataset by name) or 'folder'
    # (a folder of class subfolders holding JPEG/PNG files, ImageNet layout), or 'prepared'
    # (shards of S x S JPEG squares written by --mode=prepare: the fast way to feed a GPU).
    config.data.source = "embedded"
    config.data.name = "zf_shapes"  # tfds name when source == 'tfds'
    config.data.tfds_config = "default"  # builder config of the embedded dataset
    config.data.data_dir = ""  # tfds data dir; '' = $ZF_TF_DATA_DIR or ~/tensorflow_datasets
    config.data.manual_dir = ""  # tfds manual-download dir (imagenet2012)
    config.data.folder = ""  # root of class subfolders when source == 'folder'
    # source == 'prepared': a folder of shards written once by --mode=prepare (from the
    # source named above at the same resize_size); --mode=prepare writes it.
    config.data.prepared_dir = ""
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.image_key = "image"
    config.data.label_key = "label"
    config.data.num_classes = num_classes
    # Original label ids to keep, relabelled 0..k-1 in this order (k must equal
    # num_classes); () = all. configs/pretrain_shapes.py pretrains on 5 of the 10 shapes.
    config.data.classes = ()
    config.data.resize_size = 72  # S: shorter side resized to S, then center S x S
    config.data.crop_size = crop_size  # s: one of the 10 s x s sub-crops
    # Training crops: 'ten_crop' (the paper's: one of the 4 corner and center s x s crops of
    # the S x S square, or its mirror image) or 'scale' (a random window of min_crop_area..1
    # of the square, aspect 3/4..4/3, resized to s x s, flipped at random). Evaluation
    # always averages the paper's 10 crops.
    config.data.augment = "ten_crop"
    config.data.min_crop_area = 0.25
    config.data.mean = IMAGENET_MEAN
    # Pixels (0..255 RGB) -> model input: 'zfnet' (RGB minus data.mean, the paper's), or as
    # keras.applications' preprocess_input for models from there: 'caffe' (BGR minus the
    # ImageNet BGR means), 'tf' (x / 127.5 - 1), 'torch' (x / 255, ImageNet mean/std), or
    # 'raw' (unchanged 0..255, models that rescale inside). model.input_scale assumes 'zfnet'.
    config.data.preprocessing = "zfnet"
    config.data.shuffle_buffer = 4096
    config.data.cache = True  # decode once, keep S x S squares in memory (small datasets)
    # >= 0: train on random labels (Zhang et al. 2017): each training image's label replaced by
    # a uniform class drawn from a hash of its bytes and this seed, fixed across epochs,
    # whatever the file order; a model that memorizes noise, for --mode=sanity --compare.
    config.data.random_labels_seed = -1
    config.data.input_threads = 1  # tf.data threads; 0 = as many as cores
    # "HOST:PORT" of a tf.data service dispatcher: the training pipeline runs on its workers
    # (`python -m zf_tf.pipelines.service dispatcher|worker`); '' = here.
    # Where it runs does not change the data: not part of a run's identity.
    config.data.service_address = ""
    config.data.service_timeout = 60.0  # seconds to wait for an unreachable dispatcher

    config.model = ml_collections.ConfigDict()
    config.model.arch = "zfnet"  # or 'vgg' (a small VGG-style BN net: configs/vgg_small.py)
    config.model.input_size = crop_size
    config.model.num_classes = num_classes
    config.model.width = 0.25
    config.model.layer1 = "zfnet"  # 'zfnet' (7x7/2) or 'alexnet' (11x11/4; Fig. 6, Table 3)
    config.model.conv_filters = (96, 256, 384, 384, 256)
    config.model.fc_units = (4096, 4096)
    config.model.remove = ()  # Table 3 ablations: any of conv3, conv4, fc6, fc7 left out
    config.model.dropout = 0.5
    config.model.kernel_init = "he_normal"  # 'paper' = N(0, init_stddev)
    config.model.init_stddev = 0.01
    # > 0: conv1 alone starts from N(0, this), whatever kernel_init; 0 = as kernel_init.
    config.model.conv1_init_stddev = 0.0
    config.model.input_scale = 1 / 64  # paper: 1 (pixels minus mean, about +-128)
    config.model.max_filter_rms = 0.1  # 0 disables filter renormalization
    config.model.lrn = dict(depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75)
    config.model.seed = 0

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 64  # global batch, split across replicas
    config.train.eval_batch_size = 64
    config.train.epochs = 12
    config.train.learning_rate = 0.01
    config.train.momentum = 0.9
    config.train.weight_decay = 0.0  # SGD's decoupled weight decay (x learning rate); 0 = none
    config.train.label_smoothing = 0.0  # cross-entropy targets smoothed; 0 = the paper's
    # The learning rate rises linearly from ~0 over this many epochs (per step); 0 = none.
    config.train.warmup_epochs = 0.0
    config.train.steps_per_epoch = 0  # 0 = one pass over the training split
    config.train.cpu_replicas = 2  # logical CPU devices for --strategy=mirrored without GPUs
    # --strategy=multi_worker: seconds to wait for every worker of TF_CONFIG to join.
    config.train.cluster_timeout = 60.0
    config.train.lr_decay = 0.1  # ReduceLROnPlateau on validation loss: factor,
    config.train.lr_patience = 2  # epochs without improvement,
    config.train.min_lr = 1e-5  # and floor
    # () = the plateau schedule above; else the rate is multiplied by lr_decay after each of
    # these epochs (1-based, increasing), a fixed step schedule, and plateaus are not watched.
    config.train.lr_drop_epochs = ()
    # Dtype policy of the layers: float32 | mixed_bfloat16 | mixed_float16 (with dynamic loss
    # scaling). Variables, logits, loss and LRN stay float32; analyses load the checkpoint
    # as a float32 model. For GPUs/TPUs: on the 2-core CPU float16 is several times slower.
    config.train.precision = "float32"
    config.train.jit_compile = False  # XLA (model.compile(jit_compile=...))
    # Optional training callbacks (zf_tf/training/callbacks.py OPTIONAL); checkpoints, resume,
    # CSV and TensorBoard scalars are always on. Not part of a run's identity: they log, they
    # do not change the weights.
    config.train.callbacks = ("image_summaries", "feature_evolution")

    # Analyses (every --mode of zf_tf.analyses.REGISTRY). Not part of a run's identity:
    # analysis modes read data/model/train from the workdir's config.json and this section
    # from --config (and its overrides). The short flags --split, --untrained, --layer,
    # --layers, --top_k, --features, --num_features, --num_images, --image, --parts and
    # --compare are aliases: --NAME=V sets analysis.<mode>.NAME where the mode's section has
    # NAME, else analysis.NAME (zf_tf/cli.py ALIASES).
    config.analysis = ml_collections.ConfigDict()
    config.analysis.split = ""  # images the analyses use; '' = the data's eval split
    # True: a freshly initialized model of config.model instead of the workdir's checkpoint.
    config.analysis.untrained = False
    config.analysis.batch_size = 128  # forward-pass batch of occluded / transformed copies
    # Names the figures and the atlas show for the data's classes ({data's name: shown
    # name}, e.g. {"n03028079": "church"} for ImageNet folders); unnamed: the data's name.
    config.analysis.class_names = ml_collections.ConfigDict()

    # --mode=deconv (paper Fig. 2): the top_k strongest activations of each shown map of
    # `layer` over analysis.split, projected to pixel space beside their input patches.
    config.analysis.deconv = ml_collections.ConfigDict()
    config.analysis.deconv.layer = ""  # a conv, pool or ReLU layer; '' = the last conv layer
    config.analysis.deconv.top_k = 9  # strongest activations kept per map
    config.analysis.deconv.features = ()  # maps shown, e.g. (0, 5, 17); () = num_features maps
    config.analysis.deconv.num_features = 16  # seeded random maps shown (<= 0: all)
    # A photo file: project its own strongest maps (num_features of them) instead of a scan.
    config.analysis.deconv.image = ""

    config.analysis.occlusion = ml_collections.ConfigDict()
    config.analysis.occlusion.num_images = 8
    config.analysis.occlusion.size = 0.25  # gray square side, fraction of the crop side
    config.analysis.occlusion.stride = 0.0625  # its step, fraction of the crop side
    # Conv layer of maps (b) and (c); '' = the model's last conv layer (ZFNet: conv5).
    config.analysis.occlusion.layer = ""
    # Classes the images come from (the data's class names, e.g. folder names, or their
    # analysis.class_names, or label ids), num_images shared among them in this order;
    # () = the split's first images.
    config.analysis.occlusion.classes = ()

    config.analysis.invariance = ml_collections.ConfigDict()
    config.analysis.invariance.num_images = 5
    config.analysis.invariance.translations = (-0.25, -0.15, -0.05, 0.0, 0.05, 0.15, 0.25)
    config.analysis.invariance.scales = (0.6, 0.8, 1.0, 1.2, 1.4, 1.6)  # of the crop side
    config.analysis.invariance.rotations = tuple(range(0, 361, 30))  # degrees
    # "Layer 1" and "layer 7": '' = the model's first conv layer and its penultimate dense
    # layer (ZFNet: conv1, fc7; graph.penultimate_dense says what stands in without one).
    config.analysis.invariance.layers = ("", "")

    config.analysis.correspondence = ml_collections.ConfigDict()
    # Images compared; 0: 5 of class `label`, or every image of the `parts` file.
    config.analysis.correspondence.num_images = 0
    # A JSON file {image path: {part name: [y0, x0, y1, x1]}}: images and their parts, for
    # data without object boxes ('' = the embedded dataset's boxes).
    config.analysis.correspondence.parts = ""
    # Embedded dataset: class of the 5 images. Circles: shapes are drawn at random angles,
    # and only for a circle is each quarter of the object box the same part in every image.
    config.analysis.correspondence.label = 0
    config.analysis.correspondence.random_draws = 10
    # The paper's layers 5 and 7: '' = the model's last conv layer and its penultimate dense
    # layer (ZFNet: conv5, fc7); any layer of the model can be named.
    config.analysis.correspondence.layers = ("", "")

    config.analysis.evolution = ml_collections.ConfigDict()
    # Clipped to the run, plus its last epoch; () switches the training-time snapshots off.
    config.analysis.evolution.epochs = (1, 2, 5, 10, 20, 30, 40, 64)
    config.analysis.evolution.probe_images = 256  # fixed subset of the training split
    config.analysis.evolution.features_per_layer = 4  # seeded feature maps per layer

    config.analysis.filters = ml_collections.ConfigDict()  # --mode=filters (Fig. 6)
    config.analysis.filters.rms_threshold = 0.01  # dead: RMS < this x the largest conv1 RMS
    config.analysis.filters.active_epsilon = 1e-6  # dead: max conv1 activation <= this
    config.analysis.filters.layer2_features = 16  # seeded conv2 maps projected
    # Layer 1 (its filters: a conv on the RGB image) and layer 2 (projected): '' = the model's
    # first and second conv layers (ZFNet: conv1, conv2).
    config.analysis.filters.layers = ("", "")
    config.analysis.filters.num_images = 0  # images scanned for dead filters; 0 = the split
    # Workdir of a second model shown beside this one (e.g. AlexNet's layer 1: train it with
    # --config.model.layer1=alexnet); '' = this model alone.
    config.analysis.filters.compare = ""

    # --mode=atlas: receptive-field canvases up to 48 px are exact PNGs; larger ones are JPEG,
    # shrunk to at most `pixel_density` x the size they are shown at (a unit page's 96 px
    # cells, a layer page's 64 px thumbnails).
    config.analysis.atlas = ml_collections.ConfigDict()
    config.analysis.atlas.pixel_density = 2  # 2: sharp on high-density screens
    config.analysis.atlas.jpeg_quality = 90
    # Each unit's feature visualization too (as --mode=featvis makes it, its settings from
    # analysis.featvis, its cache shared): on unit pages, and a switch on layer pages.
    config.analysis.atlas.featvis = False
    config.analysis.atlas.layers = ()  # layers scanned, e.g. ("conv3", "conv5"); () = every conv
    config.analysis.atlas.top_k = 9  # images kept per unit

    config.analysis.attribution = ml_collections.ConfigDict()
    config.analysis.attribution.num_images = 6  # shown in the figure
    config.analysis.attribution.pointing_images = 200  # scored by the pointing game
    config.analysis.attribution.smoothgrad_samples = 20
    config.analysis.attribution.smoothgrad_noise = 0.2
    # Class explained: 'true' or 'predicted' (always 'predicted' where the labels are not the
    # model's classes: a model brought along with --model, or unlabeled images).
    config.analysis.attribution.target = "true"
    config.analysis.attribution.methods = (  # figure columns after the input (attribution.py)
        "deconvnet",
        "guided_backprop",
        "saliency",
        "smoothgrad",
        "gradcam",
        "gradcam++",
        "scorecam",
        "occlusion",
    )
    # Conv layer of Grad-CAM, Grad-CAM++, Score-CAM; '' = the model's last (ZFNet: conv5).
    config.analysis.attribution.cam_layer = ""

    # --mode=sanity (Adebayo et al. 2018): the attribution methods' maps of `num_images`
    # images of analysis.split under cascading / independent layer randomization and for
    # another class (maps as config.analysis.attribution makes them).
    config.analysis.sanity = ml_collections.ConfigDict()
    config.analysis.sanity.num_images = 8
    config.analysis.sanity.methods = config.analysis.attribution.methods
    config.analysis.sanity.steps = 20  # deletion / insertion steps (Petsiuk et al. 2018)
    # Also compared: the deconvnet projections of the top activations (over those images) of
    # the most active `projection_units` maps of `projection_layer` ("" = the last conv).
    config.analysis.sanity.projection_layer = ""
    config.analysis.sanity.projection_units = 8
    # Workdir of a second model whose maps are compared too (e.g. one trained on random
    # labels: --config.data.random_labels_seed=0); '' = none.
    config.analysis.sanity.compare = ""

    # --mode=featvis (Olah et al. 2017): each unit's optimized image, Lucid's recipe (1/f
    # Fourier basis, decorrelated colour, jitter/scale/rotation at each step, Adam).
    config.analysis.featvis = ml_collections.ConfigDict()
    config.analysis.featvis.layer = ""  # '' = the model's last conv layer
    config.analysis.featvis.features = ()  # units, e.g. (0, 5, 17); () = num_features units
    config.analysis.featvis.num_features = 16  # seeded random units (<= 0: all)
    config.analysis.featvis.steps = 256
    config.analysis.featvis.learning_rate = 0.05
    config.analysis.featvis.objective = "channel"  # or "neuron" (the centre of the map)
    config.analysis.featvis.negative = False  # True: the pattern that most inhibits the unit
    config.analysis.featvis.batch_size = 32  # units optimized together, one image each
    # Images per unit: > 1 makes a diverse set (Lucid's diversity objective: the sets'
    # Gram matrices of the layer's maps pushed apart), weighted against the objective.
    config.analysis.featvis.diversity = 1
    config.analysis.featvis.diversity_weight = 1.0
    # Training images whose colour covariance decorrelates the colour; 0: ImageNet's.
    config.analysis.featvis.color_images = 256

    # --mode=prepare (zf_tf/pipelines/prepared.py): the source's splits resized to S and
    # center-cropped once, as TFRecord shards in data.prepared_dir. Not part of a run's
    # identity: prepared.json records how the shards were made.
    config.prepare = ml_collections.ConfigDict()
    config.prepare.splits = ()  # () = data.train_split and data.eval_split
    # "jpeg" (re-encoded, jpeg_quality) or "raw" (uint8 pixels: 7x the disk, no decoding)
    config.prepare.encoding = "jpeg"
    config.prepare.jpeg_quality = 90
    config.prepare.shard_size = 1024  # images per TFRecord shard (about 25 MB at S = 256)

    # --mode=ablate (paper Table 3): every variant trains with this same budget in
    # WORKDIR/ablate/<variant>/. Not part of a run's identity (COMMAND_LINE_SECTIONS): each
    # variant's own config.json records the budget it was trained with.
    config.ablate = ml_collections.ConfigDict()
    config.ablate.variants = "all"  # or a comma list, e.g. "baseline,no_fc7" (configs/ablations.py)
    config.ablate.epochs = 3  # train.epochs of every variant
    config.ablate.steps_per_epoch = 0  # train.steps_per_epoch of every variant; 0 = full pass
    config.ablate.train_error_images = 2000  # training images scored for train error; 0 = all

    # Transfer (--mode=transfer; paper Sec. 5.2, Tables 4-6, Fig. 9): the workdir's trained
    # layers 1-7 fixed, a new softmax on a target dataset. Like `analysis`, read from
    # --config, not from the workdir. No target here: configs/transfer_*.py set one.
    config.transfer = ml_collections.ConfigDict()
    config.transfer.name = ""  # outputs in WORKDIR/transfer/<name>/; '' = no target
    config.transfer.feature_layer = "fc7"  # any layer of the source model, e.g. pool5, fc6
    config.transfer.per_class = (1, 5, 10, 15, 30, 60)  # training images per class; 0 = all
    config.transfer.draws = 3  # seeded draws of the training images per N
    config.transfer.seed = 0
    config.transfer.test_per_class = 0  # seeded cap on test images per class; 0 = all
    config.transfer.batch_size = 64  # feature extraction and scratch evaluation batch
    config.transfer.data = ml_collections.ConfigDict()  # the target; geometry: the source's
    config.transfer.data.source = "embedded"  # 'embedded', 'tfds' or 'folder'
    config.transfer.data.name = "zf_shapes"
    config.transfer.data.tfds_config = "default"
    config.transfer.data.data_dir = ""
    config.transfer.data.manual_dir = ""
    config.transfer.data.folder = ""
    config.transfer.data.train_split = "train"  # folders: 'train+validation' = every file
    config.transfer.data.test_split = "validation"  # '' = held out of train_split
    config.transfer.data.image_key = "image"
    config.transfer.data.label_key = "label"  # 'a/b' for nested tfds features
    config.transfer.data.classes = ()  # as config.data.classes
    config.transfer.data.multi_label = False  # per-class sigmoids, mean AP (PASCAL VOC)
    config.transfer.softmax = ml_collections.ConfigDict()  # on cached features
    config.transfer.softmax.steps = 300  # full-batch Adam steps from zero weights
    config.transfer.softmax.learning_rate = 0.01
    config.transfer.softmax.weight_decay = 1e-4
    config.transfer.scratch = ml_collections.ConfigDict()  # the same net, from scratch
    config.transfer.scratch.epochs = 30  # over the N-per-class images; 0 = skip
    config.transfer.scratch.batch_size = 64
    return config
