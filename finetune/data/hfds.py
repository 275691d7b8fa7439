"""placeholder: being written"""
from ..errors import FinetuneError


def build(request):
    raise FinetuneError(f"data.dataset {request.dataset}: not available yet")
