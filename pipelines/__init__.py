import warnings

# torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they are still the
# fastest JPEG paths here (libjpeg-turbo on CPUs, nvjpeg on GPUs; see benchmarks/), so keep quiet.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)
